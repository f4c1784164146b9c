/* How every kernel of memlayers splits its outer loop over threads.
 *
 * Each exported kernel takes the length of its outer loop, total, and a grain:
 * the fewest items worth a thread. It runs as one OpenMP parallel region whose
 * threads take contiguous parts [start, stop) of [0, total). Linked against the
 * libgomp that torch has loaded already, the region runs on torch's own
 * OpenMP threads (as many as torch.get_num_threads()), which are awake right
 * after torch's last parallel op, instead of on a second pool of threads
 * competing with torch's for the cores. Built without OpenMP the pragmas are
 * ignored and a kernel runs in the calling thread.
 */
#ifndef MEMLAYERS_PARALLEL_H
#define MEMLAYERS_PARALLEL_H

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads for total items of at least grain each (at least 1). */
static inline int team_size(int64_t total, int64_t grain) {
#ifdef _OPENMP
    const int64_t most = total / (grain > 0 ? grain : 1), threads = omp_get_max_threads();
    return (int)(most < 1 ? 1 : most < threads ? most : threads);
#else
    (void)total;
    (void)grain;
    return 1;
#endif
}

static inline int64_t thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int64_t thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Inside a parallel region: this thread's part [start, stop) of [0, total). */
#define THREAD_RANGE(total)                                            \
    const int64_t start = (total) * thread_index() / thread_count(),  \
                  stop = (total) * (thread_index() + 1) / thread_count()

#endif
