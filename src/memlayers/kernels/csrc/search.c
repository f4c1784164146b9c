/* CPU product-key search of memlayers: the exact top-k slots of one head from
 * the scores of its two sub-key halves, without forming the k x k candidate sums.
 *
 * Row r holds the scores s1[r, 0..n) and s2[r, 0..n) of the n sub-keys of each
 * half; slot (i, j) scores s1[r, i] + s2[r, j]. The top-k slots are among the
 * pairs of each half's top-k (Lample et al. 2019). With both halves' top-k
 * sorted in descending order a, b, no pair (i' <= i, j' <= j) scores less than
 * pair (i, j), and there are (i + 1)(j + 1) of them, so a top-k needs only pairs
 * with (i + 1)(j + 1) <= k; and only those scoring at least the larger of
 * a[k-1] + b[0] and a[0] + b[k-1] (k pairs reach each). About k ln k pairs pass
 * (knn 32: under 120 of 1,024), and the top-k of those is the same branch-light
 * selection as each half's. Compiled with bag.c into one library (kernels/cpu.py);
 * the rows are split over threads as there (parallel.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

#define MAX_KNN 1024

#if defined(__AVX2__)
#include <immintrin.h>

/* compress_lut[m]: the lanes set in the 8-bit mask m, first, as a permutation (the
 * rest 0): what AVX2 lacks of AVX-512's compress. Filled when the library loads. */
static uint32_t compress_lut[256][8];

__attribute__((constructor)) static void build_compress_lut(void) {
    for (int m = 0; m < 256; m++) {
        int t = 0;
        for (int lane = 0; lane < 8; lane++)
            if (m >> lane & 1) compress_lut[m][t++] = (uint32_t)lane;
        for (; t < 8; t++) compress_lut[m][t] = 0;
    }
}
#endif

/* Order-preserving 32-bit key of a float: larger float, larger key; NaN above
 * +inf, as torch.topk ranks it. */
static inline uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* float_key(f) ^ 0x80000000 as a signed integer: the same order, without a branch. */
static inline int32_t signed_key(float f) {
    int32_t u;
    memcpy(&u, &f, 4);
    return u ^ ((u >> 31) & 0x7fffffff);
}

/* The float's key with the sub-key id below it, so that keys are distinct and
 * equal scores rank the lower id first. */
static inline uint64_t sort_key(uint32_t key, int64_t id) {
    return ((uint64_t)key << 32) | (uint32_t)~(uint32_t)id;
}

/* Distinct keys x[0..n) in descending order. Up to RANK_SORT_MAX keys each is
 * placed at its rank (how many keys are larger): n^2 comparisons, but branch-free
 * and vectorised, which beats an insertion sort's mispredicted branches at these
 * sizes; longer runs (large knn) are insertion-sorted. */
#define RANK_SORT_MAX 64
static void sort_descending(uint64_t *x, int64_t n) {
    if (n <= RANK_SORT_MAX) {
        uint64_t sorted[RANK_SORT_MAX];
        for (int64_t i = 0; i < n; i++) {
            const uint64_t v = x[i];
            int64_t rank = 0;
            for (int64_t j = 0; j < n; j++) rank += x[j] > v;
            sorted[rank] = v;
        }
        memcpy(x, sorted, sizeof(uint64_t) * n);
        return;
    }
    for (int64_t i = 1; i < n; i++) {
        uint64_t v = x[i];
        int64_t j = i;
        for (; j > 0 && x[j - 1] < v; j--) x[j] = x[j - 1];
        x[j] = v;
    }
}

static inline uint64_t median3(uint64_t a, uint64_t b, uint64_t c) {
    if (a > b) { uint64_t t = a; a = b; b = t; }
    return c < a ? a : (c > b ? b : c);
}

/* Reorder distinct keys buf[0..hi) so that buf[0..k) holds the k largest in
 * descending order (k <= hi): quickselect with a branchless partition (a
 * data-dependent branch per element mispredicts often on scores), then the k
 * winners sorted. */
static void select_sorted(uint64_t *buf, int64_t hi, int64_t k) {
    int64_t lo = 0;
    while (hi - lo > 16) {
        uint64_t p = median3(buf[lo], buf[lo + (hi - lo) / 2], buf[hi - 1]);
        int64_t m = lo;
        for (int64_t i = lo; i < hi; i++) { /* [lo, m) >= p, [m, i) < p */
            uint64_t v = buf[i];
            buf[i] = buf[m];
            buf[m] = v;
            m += v >= p;
        }
        /* the median of three distinct keys is neither extreme, so lo < m < hi */
        if (m == k) break;
        if (m > k) hi = m;
        else lo = m;
    }
    if (hi - lo <= 16 && lo < k) sort_descending(buf + lo, hi - lo);
    sort_descending(buf, k);
}

/* The sort keys of the scores s[0..n) whose keys are >= threshold, packed into
 * buf (which has room for n + 8); returns how many. With AVX2, 8 scores at a time
 * without a branch: keys compared in signed order, the winners' lanes moved to
 * the front by a table permutation, stored whole, and the count advanced. */
static int64_t candidates(const float *s, int64_t n, uint32_t threshold, uint64_t *buf) {
    int64_t hi = 0, i = 0;
#if defined(__AVX2__)
    const __m256i low31 = _mm256_set1_epi32(0x7fffffff), top = _mm256_set1_epi32((int)0x80000000u);
    const __m256i bound = _mm256_set1_epi32((int)(threshold ^ 0x80000000u));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), ones = _mm256_set1_epi32(-1);
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(s + i));
        /* float_key(f) ^ 0x80000000: the float order as signed integers */
        const __m256i ordered = _mm256_xor_si256(u, _mm256_and_si256(_mm256_srai_epi32(u, 31), low31));
        const __m256i below = _mm256_cmpgt_epi32(bound, ordered);
        const int mask = ~_mm256_movemask_ps(_mm256_castsi256_ps(below)) & 0xff;
        const __m256i order = _mm256_loadu_si256((const __m256i *)compress_lut[mask]);
        const __m256i keys = _mm256_permutevar8x32_epi32(_mm256_xor_si256(ordered, top), order);
        const __m256i ids = _mm256_permutevar8x32_epi32(
            _mm256_xor_si256(_mm256_add_epi32(lanes, _mm256_set1_epi32((int)i)), ones), order); /* ~id */
        /* 64-bit sort keys: key above, ~id below (unpack works per 128-bit half, hence the permutes) */
        const __m256i first = _mm256_unpacklo_epi32(ids, keys), second = _mm256_unpackhi_epi32(ids, keys);
        _mm256_storeu_si256((__m256i *)(buf + hi), _mm256_permute2x128_si256(first, second, 0x20));
        _mm256_storeu_si256((__m256i *)(buf + hi + 4), _mm256_permute2x128_si256(first, second, 0x31));
        hi += __builtin_popcount((unsigned)mask);
    }
#endif
    for (; i < n; i++) {
        const uint32_t v = float_key(s[i]);
        buf[hi] = sort_key(v, i);
        hi += v >= threshold;
    }
    return hi;
}

/* The k largest of s[0..n) into val/idx in descending order.
 *
 * First a threshold that cannot exclude a winner: split the scores into k
 * groups (i mod k) and take the smallest of the k group maxima. Those maxima
 * are k distinct scores >= it, so the k-th largest score is too, and only the
 * scores >= it (about 3k of 256 for random scores) are candidates. The group
 * maxima are one vectorised pass. buf has room for n + 8 keys. */
static void top_sorted(const float *s, int64_t n, int64_t k, uint64_t *buf, float *val, int64_t *idx) {
    int32_t group_max[MAX_KNN]; /* in signed_key order: whole groups are one branch-free vector loop */
    for (int64_t j = 0; j < k; j++) group_max[j] = signed_key(s[j]);
    int64_t base = k;
    for (; base + k <= n; base += k)
        for (int64_t j = 0; j < k; j++) {
            const int32_t v = signed_key(s[base + j]);
            group_max[j] = v > group_max[j] ? v : group_max[j];
        }
    for (int64_t j = 0; base + j < n; j++) { /* the last, partial group */
        const int32_t v = signed_key(s[base + j]);
        group_max[j] = v > group_max[j] ? v : group_max[j];
    }
    int32_t least = group_max[0];
    for (int64_t j = 1; j < k; j++) least = group_max[j] < least ? group_max[j] : least;
    select_sorted(buf, candidates(s, n, (uint32_t)least ^ 0x80000000u, buf), k);
    for (int64_t t = 0; t < k; t++) {
        idx[t] = (int64_t)(uint32_t)~(uint32_t)buf[t];
        val[t] = s[idx[t]];
    }
}

/* The k best pairs of the sorted a[0..k), b[0..k) into buf[0..k), best first, as
 * keys of their sums over the pair index i * k + j. buf holds the candidates:
 * at most k (1 + ln k) (see the header). */
static void top_pairs(const float *a, const float *b, int64_t k, uint64_t *buf) {
    const uint32_t by_a = float_key(a[k - 1] + b[0]), by_b = float_key(a[0] + b[k - 1]);
    const uint32_t threshold = by_a > by_b ? by_a : by_b;
    int64_t hi = 0;
    for (int64_t i = 0; i < k; i++) {
        const int64_t width = k / (i + 1); /* (i + 1)(j + 1) <= k */
        for (int64_t j = 0; j < width; j++) {
            const uint32_t v = float_key(a[i] + b[j]);
            buf[hi] = sort_key(v, i * k + j);
            hi += v >= threshold;
        }
    }
    select_sorted(buf, hi, k);
}

/* Row r's selection from its half scores first[0..n) and first[stride_half ..+n):
 * scores[r, 0..k) descending, slots[r, .] and the sub-key rows sub[r, 0/1, .] (see
 * product_key_topk). a, b, ia, ib hold k each; buf as for top_sorted and top_pairs. */
static void select_row(const float *first, int64_t stride_half, int64_t n, int64_t k, int64_t base, int64_t r,
                       float *a, float *b, int64_t *ia, int64_t *ib, uint64_t *buf,
                       float *scores, int64_t *slots, int64_t *sub) {
    top_sorted(first, n, k, buf, a, ia);
    top_sorted(first + stride_half, n, k, buf, b, ib);
    top_pairs(a, b, k, buf);
    int64_t *sub1 = sub + 2 * r * k, *sub2 = sub1 + k;
    for (int64_t t = 0; t < k; t++) {
        const uint32_t pair = ~(uint32_t)buf[t];
        const int64_t i = pair / k, j = pair % k;
        scores[r * k + t] = a[i] + b[j];
        sub1[t] = base + ia[i];
        sub2[t] = base + n + ib[j];
        slots[r * k + t] = ia[i] * n + ib[j];
    }
}

/* Room for the candidate keys: n + 8 for a half; k (1 + ln k) < 11k for the pairs (k <= 1024). */
static inline int64_t buf_size(int64_t n, int64_t k) { return n + 8 > 11 * k ? n + 8 : 11 * k; }

/* Row r = p * heads + h of the scores, for r in [start, stop): its first half
 * starts at s + p * stride_p + h * stride_h and its second half stride_half
 * further (each half n contiguous floats). Writes scores[r, 0..k) the top-k slot
 * scores in descending order, slots[r, .] their ids i * n + j, and sub[r, 0, .] and
 * sub[r, 1, .] the sub-key rows they read: h * head_stride + i and h * head_stride + n + j
 * (head_stride 0: positions within the row's two halves; 2n: rows of all heads' sub-keys
 * as one (heads * 2 * n, d) table, which the backward reads and writes).
 * Needs 1 <= k <= min(n, MAX_KNN). Returns 0, or 1 when out of memory. */
int product_key_topk(const float *s, int64_t heads, int64_t stride_p, int64_t stride_h, int64_t stride_half,
                      int64_t n, int64_t k, float *scores, int64_t *slots, int64_t *sub, int64_t head_stride,
                      int64_t total, int64_t grain) {
    int failed = 0;
#pragma omp parallel num_threads(team_size(total, grain)) reduction(| : failed)
    {
        THREAD_RANGE(total);
        float a[MAX_KNN], b[MAX_KNN];
        int64_t ia[MAX_KNN], ib[MAX_KNN];
        const int64_t size = buf_size(n, k);
        uint64_t stack_buf[4096];
        uint64_t *buf = size <= 4096 ? stack_buf : malloc(sizeof(uint64_t) * size);
        failed = buf == NULL;
        for (int64_t r = start; r < stop && !failed; r++) {
            const float *first = s + (r / heads) * stride_p + (r % heads) * stride_h;
            select_row(first, stride_half, n, k, (r % heads) * head_stride, r, a, b, ia, ib, buf, scores, slots, sub);
        }
        if (buf != stack_buf) free(buf);
    }
    return failed;
}

/* The scores of one half's n sub-keys for nq queries q + i * q_stride (i < nq, each d
 * floats): out[i * out_stride + j] = sum_t q_i[t] kt[t n + j], with kt the half's sub-keys
 * transposed, (d, n). nq x SCORE_BLOCK sums stay in registers while t runs, so each
 * sub-key vector loaded serves nq queries; every sum runs over t in order (a product,
 * then fused multiply-adds), in the tail too. Inlined with nq a constant (SCORE_ROWS or 1). */
#define SCORE_ROWS 4
#if defined(__AVX512F__)
/* Written with 512-bit intrinsics: gcc's tuning for recent Intel cores auto-vectorises
 * with 256-bit vectors, which left half of each FMA unused (1024 keys: 47 against 30 ms). */
#define SCORE_BLOCK 64 /* 4 rows x 4 zmm accumulators */
static inline __attribute__((always_inline)) void score_block(const float *q, int64_t q_stride, int nq, const float *kt,
                                                              int64_t d, int64_t n, float *out, int64_t out_stride) {
    __m512 acc[SCORE_ROWS][4];
    for (int i = 0; i < nq; i++) {
        const __m512 q0 = _mm512_set1_ps(q[i * q_stride]);
        for (int v = 0; v < 4; v++) acc[i][v] = _mm512_mul_ps(q0, _mm512_loadu_ps(kt + 16 * v));
    }
    for (int64_t t = 1; t < d; t++) {
        const float *row = kt + t * n;
        const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16), k2 = _mm512_loadu_ps(row + 32),
                     k3 = _mm512_loadu_ps(row + 48);
        for (int i = 0; i < nq; i++) {
            const __m512 qt = _mm512_set1_ps(q[i * q_stride + t]);
            acc[i][0] = _mm512_fmadd_ps(qt, k0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(qt, k1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(qt, k2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(qt, k3, acc[i][3]);
        }
    }
    for (int i = 0; i < nq; i++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(out + i * out_stride + 16 * v, acc[i][v]);
}
#else
#define SCORE_BLOCK 16 /* 4 rows x 2 ymm with AVX2 */
static inline __attribute__((always_inline)) void score_block(const float *q, int64_t q_stride, int nq, const float *kt,
                                                              int64_t d, int64_t n, float *out, int64_t out_stride) {
    float acc[SCORE_ROWS][SCORE_BLOCK];
    for (int i = 0; i < nq; i++)
        for (int jj = 0; jj < SCORE_BLOCK; jj++) acc[i][jj] = q[i * q_stride] * kt[jj];
    for (int64_t t = 1; t < d; t++) {
        const float *row = kt + t * n;
        for (int i = 0; i < nq; i++) {
            const float qt = q[i * q_stride + t];
            for (int jj = 0; jj < SCORE_BLOCK; jj++) acc[i][jj] += qt * row[jj];
        }
    }
    for (int i = 0; i < nq; i++) memcpy(out + i * out_stride, acc[i], sizeof acc[i]);
}
#endif

static inline __attribute__((always_inline)) void score_half(const float *q, int64_t q_stride, int nq, const float *kt,
                                                             int64_t d, int64_t n, float *out, int64_t out_stride) {
    int64_t j0 = 0;
    for (; j0 + SCORE_BLOCK <= n; j0 += SCORE_BLOCK) score_block(q, q_stride, nq, kt + j0, d, n, out + j0, out_stride);
    for (int i = 0; i < nq; i++) {
        const float *qi = q + i * q_stride;
        float *o = out + i * out_stride;
        for (int64_t j = j0; j < n; j++) o[j] = qi[0] * kt[j];
        for (int64_t t = 1; t < d; t++)
            for (int64_t j = j0; j < n; j++) o[j] += qi[t] * kt[t * n + j];
    }
}

/* The product-key search with the scoring fused in: row r = p * heads + h has the
 * queries q[r, 0..2, 0..d) (contiguous) and scores them against head h's sub-keys,
 * transposed: kt (heads, 2, d, n). Rows of one head are scored SCORE_ROWS at a time into
 * a buffer (SCORE_ROWS x 2n floats) and never reach memory; the selection and outputs
 * are those of product_key_topk. */
int product_key_search(const float *q, const float *kt, int64_t heads, int64_t d, int64_t n, int64_t k,
                       float *scores, int64_t *slots, int64_t *sub, int64_t head_stride, int64_t total, int64_t grain) {
    int failed = 0;
#pragma omp parallel num_threads(team_size(total, grain)) reduction(| : failed)
    {
        THREAD_RANGE(total);
        float a[MAX_KNN], b[MAX_KNN];
        int64_t ia[MAX_KNN], ib[MAX_KNN];
        const int64_t size = buf_size(n, k), step = SCORE_ROWS * heads;
        uint64_t stack_buf[4096];
        float stack_s[SCORE_ROWS * 2048];
        uint64_t *buf = size <= 4096 ? stack_buf : malloc(sizeof(uint64_t) * size);
        float *s = n <= 1024 ? stack_s : malloc(sizeof(float) * SCORE_ROWS * 2 * n);
        failed = buf == NULL || s == NULL;
        for (int64_t h = 0; h < heads && !failed; h++) {
            const float *k1 = kt + 2 * h * d * n, *k2 = k1 + d * n;
            for (int64_t r = start + (h - start % heads + heads) % heads; r < stop; r += step) {
                const float *qr = q + 2 * r * d;
                const int64_t q_stride = 2 * heads * d;
                int nq = 0;
                while (nq < SCORE_ROWS && r + nq * heads < stop) nq++;
                if (nq == SCORE_ROWS) {
                    score_half(qr, q_stride, SCORE_ROWS, k1, d, n, s, 2 * n);
                    score_half(qr + d, q_stride, SCORE_ROWS, k2, d, n, s + n, 2 * n);
                } else {
                    for (int i = 0; i < nq; i++) {
                        score_half(qr + i * q_stride, 0, 1, k1, d, n, s + 2 * i * n, 0);
                        score_half(qr + i * q_stride + d, 0, 1, k2, d, n, s + (2 * i + 1) * n, 0);
                    }
                }
                for (int i = 0; i < nq; i++)
                    select_row(s + 2 * i * n, n, n, k, h * head_stride, r + i * heads, a, b, ia, ib, buf, scores, slots, sub);
            }
        }
        if (buf != stack_buf) free(buf);
        if (s != stack_s) free(s);
    }
    return failed;
}

/* The search's backward, per row: slot t of row r read sub-key rows sub[r, 0, t] and
 * sub[r, 1, t] with gradient g[r, t]. The knn slots of a row share sub-keys (knn 32
 * reads about 11 distinct ones per half), so each half's gradient is first folded onto
 * its distinct rows: ids[r, s, 0..m) lists them in order of first use (the rest -1) and
 * w[r, s, .] their summed gradients (in slot order; 0 after m). Then, unless grad_q is
 * NULL, grad_q[r, s] = sum over the m rows of w * keys[row] (d floats each): the queries'
 * gradient reads each distinct sub-key once. The sub-keys' own gradient is dense_grad
 * over ids and w (a -1 is in no thread's rows, so it is skipped). keys: (n_rows, d), the
 * sub-keys of all heads as one table. Returns 0, or 1 when out of memory. */
int search_backward(const float *keys, int64_t d, int64_t n_rows, const int64_t *sub, const float *g, int64_t k,
                    float *grad_q, int64_t *ids, float *w, int64_t total, int64_t grain) {
    int failed = 0;
#pragma omp parallel num_threads(team_size(total, grain)) reduction(| : failed)
    {
        THREAD_RANGE(total);
        int32_t *at = malloc(sizeof(int32_t) * n_rows); /* row -> its place in the row's list, or -1 */
        failed = at == NULL;
        if (!failed)
            for (int64_t i = 0; i < n_rows; i++) at[i] = -1;
        for (int64_t r = start; r < stop && !failed; r++) {
            const float *gr = g + r * k;
            for (int64_t s = 0; s < 2; s++) {
                const int64_t *in = sub + (2 * r + s) * k;
                int64_t *out = ids + (2 * r + s) * k;
                float *wo = w + (2 * r + s) * k;
                int64_t m = 0;
                for (int64_t t = 0; t < k; t++) {
                    const int64_t row = in[t];
                    if (at[row] < 0) {
                        at[row] = (int32_t)m;
                        out[m] = row;
                        wo[m++] = gr[t];
                    } else {
                        wo[at[row]] += gr[t];
                    }
                }
                for (int64_t i = 0; i < m; i++) at[out[i]] = -1;
                for (int64_t i = m; i < k; i++) {
                    out[i] = -1;
                    wo[i] = 0.0f;
                }
                if (grad_q == NULL) continue;
                float *restrict o = grad_q + (2 * r + s) * d;
                for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
                int64_t i = 0;
                for (; i + 4 <= m; i += 4) {
                    const float *restrict r0 = keys + out[i] * d, *restrict r1 = keys + out[i + 1] * d,
                                          *restrict r2 = keys + out[i + 2] * d, *restrict r3 = keys + out[i + 3] * d;
                    const float w0 = wo[i], w1 = wo[i + 1], w2 = wo[i + 2], w3 = wo[i + 3];
#pragma omp simd
                    for (int64_t c = 0; c < d; c++) o[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
                }
                for (; i < m; i++) {
                    const float *restrict row = keys + out[i] * d;
                    const float wi = wo[i];
#pragma omp simd
                    for (int64_t c = 0; c < d; c++) o[c] += wi * row[c];
                }
            }
        }
        free(at);
    }
    return failed;
}
