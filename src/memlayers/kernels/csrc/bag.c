/* CPU kernels of memlayers: the weighted embedding bag, its weight gradient,
 * and row-sparse optimizer updates fused with the row-gradient reduction.
 *
 * Plain C99 (OpenMP where the compiler has it); compiled on first use by
 * memlayers/kernels/cpu.py and called through ctypes. Tables are float32 or
 * bfloat16 (as uint16); all arithmetic is float32. Every function splits its
 * outer loop of total items over threads (parallel.h): each thread works on its
 * range [start, stop).
 *
 * The row gradient of a table is kept factored: lookup j of bag b read row
 * ids[j] with weight w[j], so grad(row) = sum over lookups j of that row of
 * w[j] * grad_out[b]. Lookups are sorted by row ("segments"): segment u covers
 * members [seg[u], seg[u+1]) of the sorted bag ids and weights.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "parallel.h"

#define PREFETCH_AHEAD 16

static inline float bf16_load(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
#define BF16_LOAD(x) bf16_load(x)
#define BF16_STORE(x) bf16_store(x)

static inline void prefetch_row(const void *row, int64_t bytes) {
    const char *p = (const char *)row;
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 0);
}

/* Rows are read UNROLL at a time: independent streams keep enough loads in
 * flight to approach memory bandwidth (one row at a time is latency-bound). */
#define UNROLL 8

/* out[s] = sum_{j in [offsets[s], offsets[s+1])} w[j] * table[ids[j]]  (CSR bags, float32 out) */
#define DEFINE_BAG(NAME, T, LOAD)                                                                      \
    void NAME(const T *table, int64_t d, const int64_t *ids, const float *w, const int64_t *offsets,    \
              float *out, int64_t total, int64_t grain) {                                               \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        for (int64_t s = start; s < stop; s++) {                                                       \
            float *restrict o = out + s * d;                                                           \
            for (int64_t c = 0; c < d; c++) o[c] = 0.0f;                                               \
            int64_t j = offsets[s];                                                                    \
            const int64_t end = offsets[s + 1];                                                        \
            for (; j + UNROLL <= end; j += UNROLL) {                                                   \
                const T *restrict r[UNROLL];                                                           \
                float x[UNROLL];                                                                       \
                for (int q = 0; q < UNROLL; q++) {                                                     \
                    r[q] = table + ids[j + q] * d;                                                     \
                    x[q] = w[j + q];                                                                   \
                }                                                                                      \
                _Pragma("omp simd") for (int64_t c = 0; c < d; c++) o[c] +=                            \
                    x[0] * LOAD(r[0][c]) + x[1] * LOAD(r[1][c]) + x[2] * LOAD(r[2][c]) +               \
                    x[3] * LOAD(r[3][c]) + x[4] * LOAD(r[4][c]) + x[5] * LOAD(r[5][c]) +               \
                    x[6] * LOAD(r[6][c]) + x[7] * LOAD(r[7][c]);                                       \
            }                                                                                          \
            for (; j < end; j++) {                                                                     \
                const T *restrict row = table + ids[j] * d;                                            \
                const float wj = w[j];                                                                 \
                _Pragma("omp simd") for (int64_t c = 0; c < d; c++) o[c] += wj * LOAD(row[c]);         \
            }                                                                                          \
        }                                                                                              \
        }                                                                                               \
    }

/* out[b * K + k] = grad_out[b] . table[ids[b * K + k]]  (weight gradient of fixed-size bags).
 * UNROLL rows at a time, as the bag: each row's dot product is kept in LANES partial sums
 * (one vector register) and reduced once at the end, instead of a horizontal sum per chunk. */
#define LANES 8
#define DEFINE_BAG_DOT(NAME, T, LOAD)                                                                  \
    void NAME(const T *table, int64_t d, const int64_t *ids, int64_t K, const float *grad_out,          \
              float *out, int64_t total, int64_t grain) {                                               \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        const int64_t body = d - d % LANES;                                                            \
        for (int64_t b = start; b < stop; b++) {                                                       \
            const float *restrict g = grad_out + b * d;                                                \
            int64_t j = b * K;                                                                         \
            const int64_t end = (b + 1) * K;                                                           \
            for (; j + UNROLL <= end; j += UNROLL) {                                                   \
                const T *restrict r[UNROLL];                                                           \
                for (int q = 0; q < UNROLL; q++) r[q] = table + ids[j + q] * d;                        \
                float acc[UNROLL][LANES] = {{0.0f}};                                                   \
                for (int64_t c = 0; c < body; c += LANES)                                              \
                    for (int q = 0; q < UNROLL; q++)                                                   \
                        _Pragma("omp simd") for (int l = 0; l < LANES; l++) acc[q][l] +=               \
                            g[c + l] * LOAD(r[q][c + l]);                                              \
                for (int q = 0; q < UNROLL; q++) {                                                     \
                    float total = 0.0f;                                                                \
                    for (int l = 0; l < LANES; l++) total += acc[q][l];                                \
                    for (int64_t c = body; c < d; c++) total += g[c] * LOAD(r[q][c]);                  \
                    out[j + q] = total;                                                                \
                }                                                                                      \
            }                                                                                          \
            for (; j < end; j++) {                                                                     \
                const T *restrict row = table + ids[j] * d;                                            \
                float acc = 0.0f;                                                                      \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t c = 0; c < d; c++) acc +=          \
                    g[c] * LOAD(row[c]);                                                               \
                out[j] = acc;                                                                          \
            }                                                                                          \
        }                                                                                              \
        }                                                                                               \
    }

/* The dense table gradient of fixed-size bags, rows [start, stop) of it:
 * grad[r] = sum over lookups j with ids[j] == r of w[j] * grad_out[j / K], summed in ascending j
 * (so each row's sum has one order however the rows are split over threads; each thread
 * scans every lookup and keeps those of its rows: an id in no thread's range, such as the -1
 * padding of the search's backward, is skipped). The rows in range are zeroed first.
 * With a table, the same pass also writes the weight gradient of the lookups of its rows,
 * dots[j] = grad_out[j / K] . table[ids[j]] (LANES partial sums, as bag_dot): the read's
 * whole backward, each row of the table and of its gradient visited together.
 * The lookups are taken CHUNK at a time: first those of this thread's rows are listed
 * without a branch (a branch per lookup on which thread owns its row mispredicts half the
 * time), then the listed ones are applied, their rows prefetched ahead when the thread's
 * rows are too many to stay in L2. */
#define CHUNK 2048
#define PREFETCH_ABOVE (1 << 20) /* bytes of gradient rows per thread: below, they stay in L2 */
#define DEFINE_DENSE_GRAD(NAME, T, LOAD)                                                               \
    void NAME(float *grad, int64_t d, const int64_t *ids, const float *w, int64_t n_lookups, int64_t K, \
              const float *grad_out, const T *table, float *dots, int64_t total, int64_t grain) {       \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        memset(grad + start * d, 0, (size_t)(stop - start) * (size_t)d * sizeof(float));               \
        const int64_t body = d - d % LANES;                                                            \
        const int far = (stop - start) * d * (int64_t)sizeof(float) > PREFETCH_ABOVE;                  \
        int64_t mine[CHUNK], bag_of[CHUNK];                                                            \
        for (int64_t first = 0, b = 0, bag_end = K; first < n_lookups; first += CHUNK) {               \
            const int64_t last = first + CHUNK < n_lookups ? first + CHUNK : n_lookups;                \
            int64_t n = 0;                                                                             \
            for (int64_t j = first; j < last; j++) {                                                   \
                if (j == bag_end) { /* the bag of lookup j, j / K, without a division */               \
                    b++;                                                                                \
                    bag_end += K;                                                                      \
                }                                                                                      \
                mine[n] = j;                                                                           \
                bag_of[n] = b;                                                                         \
                n += (uint64_t)(ids[j] - start) < (uint64_t)(stop - start);                            \
            }                                                                                          \
            for (int64_t i = 0; i < n; i++) {                                                          \
                if (far && i + PREFETCH_AHEAD < n) {                                                   \
                    const int64_t ahead = ids[mine[i + PREFETCH_AHEAD]];                               \
                    prefetch_row(grad + ahead * d, d * (int64_t)sizeof(float));                        \
                    if (table != NULL) prefetch_row(table + ahead * d, d * (int64_t)sizeof(T));         \
                }                                                                                      \
                const int64_t j = mine[i], r = ids[j];                                                 \
                float *restrict o = grad + r * d;                                                      \
                const float *restrict g = grad_out + bag_of[i] * d;                                    \
                if (table != NULL) {                                                                   \
                    const T *restrict row = table + r * d;                                             \
                    float acc[LANES] = {0.0f};                                                         \
                    for (int64_t c = 0; c < body; c += LANES)                                          \
                        _Pragma("omp simd") for (int l = 0; l < LANES; l++) acc[l] += g[c + l] * LOAD(row[c + l]); \
                    float total = 0.0f;                                                                \
                    for (int l = 0; l < LANES; l++) total += acc[l];                                   \
                    for (int64_t c = body; c < d; c++) total += g[c] * LOAD(row[c]);                   \
                    dots[j] = total;                                                                   \
                }                                                                                      \
                const float wj = w[j];                                                                 \
                _Pragma("omp simd") for (int64_t c = 0; c < d; c++) o[c] += wj * g[c];                 \
            }                                                                                          \
        }                                                                                              \
        }                                                                                               \
    }

/* The threads a kernel may use (torch.get_num_threads() when torch's libgomp is the one
 * loaded), or 0 when the library was built without OpenMP. */
int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}

DEFINE_BAG(bag_f32, float, F32_LOAD)
DEFINE_BAG(bag_bf16, uint16_t, BF16_LOAD)
DEFINE_BAG_DOT(bag_dot_f32, float, F32_LOAD)
DEFINE_BAG_DOT(bag_dot_bf16, uint16_t, BF16_LOAD)
DEFINE_DENSE_GRAD(dense_grad_f32, float, F32_LOAD)
DEFINE_DENSE_GRAD(dense_grad_bf16, uint16_t, BF16_LOAD)

/* acc = scale * sum over the members of segment u of w * grad_out[bag] */
static inline void segment_grad(int64_t u, const int64_t *seg, const int64_t *bags, const float *w,
                                const float *grad_out, int64_t d, float scale, float *restrict acc, int64_t last) {
    for (int64_t c = 0; c < d; c++) acc[c] = 0.0f;
    for (int64_t j = seg[u]; j < seg[u + 1]; j++) {
        /* grad_out rows are read in random order: fetch ahead */
        if (j + PREFETCH_AHEAD < last) prefetch_row(grad_out + bags[j + PREFETCH_AHEAD] * d, d * 4);
        const float *restrict g = grad_out + bags[j] * d;
        const float wj = w[j] * scale;
#pragma omp simd
        for (int64_t c = 0; c < d; c++) acc[c] += wj * g[c];
    }
}

/* sum over the segments of |row gradient|^2 (for gradient clipping). A row read by one
 * lookup (most rows of a large table) has the gradient w * grad_out[bag], so its square is
 * w^2 |grad_out[bag]|^2 from bag_sq (n_bags floats, filled here first): no row is summed for it.
 * Each thread's part is summed alone, then the parts in thread order, so a thread count gives
 * one result. */
double row_grad_sq_norm(const int64_t *seg, const int64_t *bags, const float *w, const float *grad_out,
                        int64_t d, int64_t n_bags, float *bag_sq, int64_t total, int64_t grain) {
    const int team = team_size(total, grain);
    double parts[team];
    for (int t = 0; t < team; t++) parts[t] = 0.0;
#pragma omp parallel num_threads(team)
    {
        const int64_t t = thread_index(), threads = thread_count();
        for (int64_t b = n_bags * t / threads; b < n_bags * (t + 1) / threads; b++) {
            const float *restrict g = grad_out + b * d;
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (int64_t c = 0; c < d; c++) sq += g[c] * g[c];
            bag_sq[b] = sq;
        }
#pragma omp barrier
        THREAD_RANGE(total);
        float acc[d];
        double sum = 0.0;
        for (int64_t u = start; u < stop; u++) {
            if (seg[u + 1] - seg[u] == 1) {
                const int64_t j = seg[u];
                sum += (double)(w[j] * w[j]) * bag_sq[bags[j]];
                continue;
            }
            segment_grad(u, seg, bags, w, grad_out, d, 1.0f, acc, seg[stop]);
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (int64_t c = 0; c < d; c++) sq += acc[c] * acc[c];
            sum += sq;
        }
        parts[thread_index()] = sum;
    }
    double sum = 0.0;
    for (int t = 0; t < team; t++) sum += parts[t];
    return sum;
}

/* prefetch row rows[u + PREFETCH_AHEAD] of a (N, d) array of element type T */
#define ROW_PREFETCH(BASE, T)                                                                \
    if (u + PREFETCH_AHEAD < stop) prefetch_row((BASE) + rows[u + PREFETCH_AHEAD] * d, d * (int64_t)sizeof(T))

/* SGD with decoupled weight decay on the touched rows: p = p * (1 - lr * wd) - lr * g */
#define DEFINE_SGD(NAME, T, LOAD, STORE)                                                                 \
    void NAME(T *table, int64_t d, const int64_t *rows, const int64_t *seg, const int64_t *bags,          \
              const float *w, const float *grad_out, float scale, float lr, float wd, int64_t total,      \
              int64_t grain) {                                                                             \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        float g[d];                                                                                       \
        const float decay = 1.0f - lr * wd;                                                               \
        for (int64_t u = start; u < stop; u++) {                                                          \
            ROW_PREFETCH(table, T);                                                                              \
            segment_grad(u, seg, bags, w, grad_out, d, scale, g, seg[stop]);                                  \
            T *p = table + rows[u] * d;                                                                   \
            for (int64_t c = 0; c < d; c++) p[c] = STORE(LOAD(p[c]) * decay - lr * g[c]);                 \
        }                                                                                                 \
        }                                                                                               \
    }

/* Row-wise Adagrad (one float32 state per row, as FBGEMM's embedding tables):
 * s += mean(g^2); p = p * (1 - lr * wd) - lr * g / (sqrt(s) + eps) */
#define DEFINE_ADAGRAD(NAME, T, LOAD, STORE)                                                             \
    void NAME(T *table, float *state, int64_t d, const int64_t *rows, const int64_t *seg,                 \
              const int64_t *bags, const float *w, const float *grad_out, float scale, float lr, float eps, \
              float wd, int64_t total, int64_t grain) {                                                    \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        float g[d];                                                                                       \
        const float decay = 1.0f - lr * wd;                                                               \
        for (int64_t u = start; u < stop; u++) {                                                          \
            ROW_PREFETCH(table, T);                                                                              \
            segment_grad(u, seg, bags, w, grad_out, d, scale, g, seg[stop]);                                  \
            float sq = 0.0f;                                                                              \
            _Pragma("omp simd reduction(+ : sq)") for (int64_t c = 0; c < d; c++) sq += g[c] * g[c];      \
            const int64_t r = rows[u];                                                                    \
            const float s = state[r] + sq / (float)d;                                                     \
            state[r] = s;                                                                                 \
            const float step = lr / (sqrtf(s) + eps);                                                     \
            T *p = table + r * d;                                                                         \
            for (int64_t c = 0; c < d; c++) p[c] = STORE(LOAD(p[c]) * decay - step * g[c]);               \
        }                                                                                                 \
        }                                                                                               \
    }

/* AdamW on the touched rows with a per-row step count (bias correction of a row
 * first touched late is that of its own first step):
 * m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 * p = p * (1 - lr * wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps) */
#define DEFINE_ADAM(NAME, T, LOAD, STORE, S, SLOAD, SSTORE)                                              \
    void NAME(T *table, S *exp_avg, S *exp_avg_sq, int32_t *steps, int64_t d, const int64_t *rows,        \
              const int64_t *seg, const int64_t *bags, const float *w, const float *grad_out, float scale, \
              float lr, float beta1, float beta2, float eps, float wd, int64_t total, int64_t grain) {      \
        _Pragma("omp parallel num_threads(team_size(total, grain))") {                                  \
        THREAD_RANGE(total);                                                                            \
        float g[d];                                                                                       \
        const float decay = 1.0f - lr * wd;                                                               \
        for (int64_t u = start; u < stop; u++) {                                                          \
            ROW_PREFETCH(table, T);                                                                       \
            ROW_PREFETCH(exp_avg, S);                                                                     \
            ROW_PREFETCH(exp_avg_sq, S);                                                                  \
            segment_grad(u, seg, bags, w, grad_out, d, scale, g, seg[stop]);                                  \
            const int64_t r = rows[u];                                                                    \
            const int32_t t = steps[r] + 1;                                                               \
            steps[r] = t;                                                                                 \
            const float step_size = lr / (1.0f - powf(beta1, (float)t));                                  \
            const float root_bc2 = sqrtf(1.0f - powf(beta2, (float)t));                                   \
            T *p = table + r * d;                                                                         \
            S *m = exp_avg + r * d;                                                                       \
            S *v = exp_avg_sq + r * d;                                                                    \
            for (int64_t c = 0; c < d; c++) {                                                             \
                const float mc = beta1 * SLOAD(m[c]) + (1.0f - beta1) * g[c];                             \
                const float vc = beta2 * SLOAD(v[c]) + (1.0f - beta2) * g[c] * g[c];                      \
                m[c] = SSTORE(mc);                                                                        \
                v[c] = SSTORE(vc);                                                                        \
                p[c] = STORE(LOAD(p[c]) * decay - step_size * mc / (sqrtf(vc) / root_bc2 + eps));         \
            }                                                                                             \
        }                                                                                                 \
        }                                                                                               \
    }

DEFINE_SGD(sgd_f32, float, F32_LOAD, F32_STORE)
DEFINE_SGD(sgd_bf16, uint16_t, BF16_LOAD, BF16_STORE)
DEFINE_ADAGRAD(adagrad_f32, float, F32_LOAD, F32_STORE)
DEFINE_ADAGRAD(adagrad_bf16, uint16_t, BF16_LOAD, BF16_STORE)
DEFINE_ADAM(adam_f32_f32, float, F32_LOAD, F32_STORE, float, F32_LOAD, F32_STORE)
DEFINE_ADAM(adam_f32_bf16, float, F32_LOAD, F32_STORE, uint16_t, BF16_LOAD, BF16_STORE)
DEFINE_ADAM(adam_bf16_f32, uint16_t, BF16_LOAD, BF16_STORE, float, F32_LOAD, F32_STORE)
DEFINE_ADAM(adam_bf16_bf16, uint16_t, BF16_LOAD, BF16_STORE, uint16_t, BF16_LOAD, BF16_STORE)
