// The library's own worker threads for the kernels. Independent of torch's intra-op pool, so the
// averaging running in a background thread neither takes nor resizes the threads that training
// uses. The calling thread works too: a pool of n threads keeps n - 1 workers.
#pragma once

#include <cstdint>
#include <functional>

namespace oe {

// Threads a kernel call may use (>= 1). The first call reads OFFLOAD_EMA_NUM_THREADS, else the
// CPUs this process may run on, capped at 16 (host memory bandwidth is saturated well before).
int get_num_threads();
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) on at most get_num_threads() threads, one per `grain`
// elements (the calling thread first, then pool workers), in ranges whose boundaries are
// multiples of `align`, several per thread, taken dynamically. Returns when every range is
// done. Calls from several threads at once are serialised. fn must not throw.
void parallel_for(int64_t n, int64_t grain, int64_t align,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace oe
