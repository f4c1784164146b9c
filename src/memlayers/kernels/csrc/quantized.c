/* CPU bags over quantized value tables (inference): rows are dequantized while
 * they are summed, so a table stays 4 or 8 times smaller than in float32.
 *
 * int8: row r holds d signed codes and one float scale; value = scale[r] * code.
 * int4: row r holds d / 2 bytes (code c at byte c / 2, low nibble first, stored
 * with +8 so a nibble is 0..15 for codes -8..7) and d / g float scales, one per
 * group of g consecutive columns; value = scale[r, c / g] * code.
 * Same CSR bags as bag.c: out[s] = sum over j in [offsets[s], offsets[s+1]) of
 * w[j] * value(ids[j]), float32 out, the bags split over threads (parallel.h).
 */
#include <stdint.h>

#include "parallel.h"

void bag_q8(const int8_t *codes, const float *scales, int64_t d, const int64_t *ids, const float *w,
            const int64_t *offsets, float *out, int64_t total, int64_t grain) {
#pragma omp parallel for num_threads(team_size(total, grain)) schedule(static)
    for (int64_t s = 0; s < total; s++) {
        float *restrict o = out + s * d;
        for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
        for (int64_t j = offsets[s]; j < offsets[s + 1]; j++) {
            const int8_t *restrict row = codes + ids[j] * d;
            const float x = w[j] * scales[ids[j]];
#pragma omp simd
            for (int64_t c = 0; c < d; c++) o[c] += x * (float)row[c];
        }
    }
}

void bag_q4(const uint8_t *codes, const float *scales, int64_t d, int64_t g, const int64_t *ids, const float *w,
            const int64_t *offsets, float *out, int64_t total, int64_t grain) {
    const int64_t groups = d / g;
#pragma omp parallel for num_threads(team_size(total, grain)) schedule(static)
    for (int64_t s = 0; s < total; s++) {
        float *restrict o = out + s * d;
        for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
        for (int64_t j = offsets[s]; j < offsets[s + 1]; j++) {
            const uint8_t *restrict row = codes + ids[j] * (d / 2);
            const float *restrict sc = scales + ids[j] * groups;
            for (int64_t q = 0; q < groups; q++) {
                const float x = w[j] * sc[q];
                const uint8_t *restrict bytes = row + q * (g / 2);
                float *restrict og = o + q * g;
#pragma omp simd
                for (int64_t b = 0; b < g / 2; b++) {
                    og[2 * b] += x * (float)((int)(bytes[b] & 15) - 8);
                    og[2 * b + 1] += x * (float)((int)(bytes[b] >> 4) - 8);
                }
            }
        }
    }
}
