/* CPU product-key search of memlayers: the exact top-k slots of one head from
 * the scores of its two sub-key halves, without forming the k x k candidate sums.
 *
 * Row r holds the scores s1[r, 0..n) and s2[r, 0..n) of the n sub-keys of each
 * half; slot (i, j) scores s1[r, i] + s2[r, j]. The top-k slots are among the
 * pairs of each half's top-k (Lample et al. 2019). With both halves' top-k
 * sorted in descending order a, b, the best remaining pair is always on the
 * frontier of the pairs already taken, so a max-heap over that frontier yields
 * the top-k sums in order in O(k log k), instead of O(k^2) for all k^2 sums and
 * a selection over them. Compiled with bag.c into one library (kernels/cpu.py);
 * every function works on the row range [start, stop) so callers can split it
 * over threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_KNN 1024

/* Order-preserving 32-bit key of a float: larger float, larger key; NaN above
 * +inf, as torch.topk ranks it. */
static inline uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The float's key with the sub-key id below it, so that keys are distinct and
 * equal scores rank the lower id first. */
static inline uint64_t sort_key(uint32_t key, int64_t id) {
    return ((uint64_t)key << 32) | (uint32_t)~(uint32_t)id;
}

static void sort_descending(uint64_t *x, int64_t n) { /* insertion sort: n is small */
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

/* The k largest of s[0..n) into val/idx in descending order.
 *
 * First a threshold that cannot exclude a winner: split the scores into k
 * groups (i mod k) and take the smallest of the k group maxima. Those maxima
 * are k distinct scores >= it, so the k-th largest score is too, and only the
 * scores >= it (about 3k of 256 for random scores) are candidates. The group
 * maxima are one vectorised pass. Then quickselect over the candidates' keys
 * with a branchless partition (a data-dependent branch per element, as a heap
 * of the best k takes, mispredicts often on scores), and the k winners
 * sorted. buf holds n keys. */
static void top_sorted(const float *s, int64_t n, int64_t k, uint64_t *buf, float *val, int64_t *idx) {
    uint32_t group_max[MAX_KNN];
    for (int64_t j = 0; j < k; j++) group_max[j] = 0;
    for (int64_t base = 0; base < n; base += k) {
        int64_t width = n - base < k ? n - base : k;
        for (int64_t j = 0; j < width; j++) {
            uint32_t v = float_key(s[base + j]);
            group_max[j] = v > group_max[j] ? v : group_max[j];
        }
    }
    uint32_t threshold = group_max[0];
    for (int64_t j = 1; j < k; j++) threshold = group_max[j] < threshold ? group_max[j] : threshold;
    int64_t hi = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = float_key(s[i]);
        buf[hi] = sort_key(v, i);
        hi += v >= threshold;
    }
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
    for (int64_t t = 0; t < k; t++) {
        idx[t] = (int64_t)(uint32_t)~(uint32_t)buf[t];
        val[t] = s[idx[t]];
    }
}

typedef struct {
    float score;
    int32_t i, j; /* positions in the sorted top-k of each half */
} pair_t;

static void heap_push(pair_t *heap, int64_t *size, pair_t p) {
    int64_t pos = (*size)++;
    while (pos > 0 && heap[(pos - 1) / 2].score < p.score) {
        heap[pos] = heap[(pos - 1) / 2];
        pos = (pos - 1) / 2;
    }
    heap[pos] = p;
}

static pair_t heap_pop(pair_t *heap, int64_t *size) {
    pair_t top = heap[0], last = heap[--(*size)];
    int64_t pos = 0;
    for (;;) {
        int64_t c = 2 * pos + 1;
        if (c >= *size) break;
        if (c + 1 < *size && heap[c + 1].score > heap[c].score) c++;
        if (heap[c].score <= last.score) break;
        heap[pos] = heap[c];
        pos = c;
    }
    heap[pos] = last;
    return top;
}

/* Row r = p * heads + h of the scores, for r in [start, stop): its first half
 * starts at s + p * stride_p + h * stride_h and its second half stride_half
 * further (each half n contiguous floats). Writes scores[r, 0..k) the top-k slot
 * scores in descending order, slots[r, .] their ids i * n + j, and sub1/sub2[r, .]
 * their sub-key ids i and j (what the backward scatters into).
 * Needs 1 <= k <= min(n, MAX_KNN). Returns 0, or 1 when out of memory. */
int product_key_topk(const float *s, int64_t heads, int64_t stride_p, int64_t stride_h, int64_t stride_half,
                      int64_t n, int64_t k, float *scores, int64_t *slots, int64_t *sub1, int64_t *sub2,
                      int64_t start, int64_t stop) {
    float a[MAX_KNN], b[MAX_KNN];
    int64_t ia[MAX_KNN], ib[MAX_KNN];
    pair_t heap[MAX_KNN + 1];
    uint64_t stack_buf[4096];
    uint64_t *buf = n <= 4096 ? stack_buf : malloc(sizeof(uint64_t) * n);
    if (buf == NULL) return 1;
    for (int64_t r = start; r < stop; r++) {
        const float *first = s + (r / heads) * stride_p + (r % heads) * stride_h;
        top_sorted(first, n, k, buf, a, ia);
        top_sorted(first + stride_half, n, k, buf, b, ib);
        int64_t size = 0;
        heap_push(heap, &size, (pair_t){a[0] + b[0], 0, 0});
        for (int64_t t = 0; t < k; t++) {
            /* each pair enters once: (i, j + 1) from (i, j), and (i + 1, 0) from (i, 0) */
            pair_t p = heap_pop(heap, &size);
            scores[r * k + t] = p.score;
            sub1[r * k + t] = ia[p.i];
            sub2[r * k + t] = ib[p.j];
            slots[r * k + t] = ia[p.i] * n + ib[p.j];
            if (p.j + 1 < k) heap_push(heap, &size, (pair_t){a[p.i] + b[p.j + 1], p.i, p.j + 1});
            if (p.j == 0 && p.i + 1 < k) heap_push(heap, &size, (pair_t){a[p.i + 1] + b[0], p.i + 1, 0});
        }
    }
    if (buf != stack_buf) free(buf);
    return 0;
}
