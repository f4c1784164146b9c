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

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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
            int64_t c = 0;
#if defined(__AVX512F__)
            /* explicit: gcc's own vectorisation of this loop (256-bit, by its tuning) is 2x slower */
            const __m512 vx = _mm512_set1_ps(x);
            for (; c + 16 <= d; c += 16) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + c))));
                _mm512_storeu_ps(o + c, _mm512_fmadd_ps(vx, v, _mm512_loadu_ps(o + c)));
            }
#endif
            for (; c < d; c++) o[c] += x * (float)row[c];
        }
    }
}

/* og[0..2n) += x * (code - 8) for the two nibbles of each of bytes[0..n), low nibble first.
 * The vector paths widen 16 (AVX-512) or 8 (AVX2) bytes to int32 lanes, split them into
 * low and high nibbles, and interleave the two back into column order with a permutation:
 * a plain loop with stride-2 stores is not vectorised well (3x slower at 32 columns a group).
 * Each value is x * code added once, as in the scalar tail, so every path gives the same sums. */
static inline void add_nibbles(float *restrict og, const uint8_t *restrict bytes, int64_t n, float x) {
    int64_t b = 0;
#if defined(__AVX512F__)
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 vx = _mm512_set1_ps(x);
    for (; b + 16 <= n; b += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + b)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low), eight));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
        float *o = og + 2 * b;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(vx, _mm512_permutex2var_ps(lo, first, hi), _mm512_loadu_ps(o)));
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(vx, _mm512_permutex2var_ps(lo, second, hi), _mm512_loadu_ps(o + 16)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    const __m256 vx = _mm256_set1_ps(x);
    for (; b + 8 <= n; b += 8) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + b)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, low), eight));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
        const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi); /* l0 h0 l1 h1 | l4 h4 l5 h5 */
        float *o = og + 2 * b;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(vx, _mm256_permute2f128_ps(a, c, 0x20), _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(vx, _mm256_permute2f128_ps(a, c, 0x31), _mm256_loadu_ps(o + 8)));
    }
#endif
    for (; b < n; b++) {
        og[2 * b] += x * (float)((int)(bytes[b] & 15) - 8);
        og[2 * b + 1] += x * (float)((int)(bytes[b] >> 4) - 8);
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
            for (int64_t q = 0; q < groups; q++) add_nibbles(o + q * g, row + q * (g / 2), g / 2, w[j] * sc[q]);
        }
    }
}
