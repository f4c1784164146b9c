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

/* The k largest of s[0..n) into val/idx in descending order: a min-heap of the
 * best k seen so far (one comparison per element once it is full), then
 * heap-sorted in place, which leaves a min-heap in descending order. */
static void top_sorted(const float *s, int64_t n, int64_t k, float *val, int64_t *idx) {
    for (int64_t t = 0; t < n; t++) {
        int64_t pos;
        if (t < k) {
            pos = t; /* sift up */
            while (pos > 0 && s[t] < val[(pos - 1) / 2]) {
                val[pos] = val[(pos - 1) / 2];
                idx[pos] = idx[(pos - 1) / 2];
                pos = (pos - 1) / 2;
            }
        } else if (s[t] > val[0]) {
            pos = 0; /* replace the smallest, sift down */
            for (;;) {
                int64_t c = 2 * pos + 1;
                if (c >= k) break;
                if (c + 1 < k && val[c + 1] < val[c]) c++;
                if (val[c] >= s[t]) break;
                val[pos] = val[c];
                idx[pos] = idx[c];
                pos = c;
            }
        } else {
            continue;
        }
        val[pos] = s[t];
        idx[pos] = t;
    }
    for (int64_t end = k - 1; end > 0; end--) { /* move the minimum behind the heap */
        float v = val[end];
        int64_t i = idx[end];
        val[end] = val[0];
        idx[end] = idx[0];
        int64_t pos = 0;
        for (;;) {
            int64_t c = 2 * pos + 1;
            if (c >= end) break;
            if (c + 1 < end && val[c + 1] < val[c]) c++;
            if (val[c] >= v) break;
            val[pos] = val[c];
            idx[pos] = idx[c];
            pos = c;
        }
        val[pos] = v;
        idx[pos] = i;
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

#define MAX_KNN 1024

/* Row r = p * heads + h of the scores, for r in [start, stop): its first half
 * starts at s + p * stride_p + h * stride_h and its second half stride_half
 * further (each half n contiguous floats). Writes scores[r, 0..k) the top-k slot
 * scores in descending order, slots[r, .] their ids i * n + j, and sub1/sub2[r, .]
 * their sub-key ids i and j (what the backward scatters into).
 * Needs 1 <= k <= min(n, MAX_KNN). */
void product_key_topk(const float *s, int64_t heads, int64_t stride_p, int64_t stride_h, int64_t stride_half,
                      int64_t n, int64_t k, float *scores, int64_t *slots, int64_t *sub1, int64_t *sub2,
                      int64_t start, int64_t stop) {
    float a[MAX_KNN], b[MAX_KNN];
    int64_t ia[MAX_KNN], ib[MAX_KNN];
    pair_t heap[MAX_KNN + 1];
    for (int64_t r = start; r < stop; r++) {
        const float *first = s + (r / heads) * stride_p + (r % heads) * stride_h;
        top_sorted(first, n, k, a, ia);
        top_sorted(first + stride_half, n, k, b, ib);
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
}
