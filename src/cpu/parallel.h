// A small fork-join helper for the CPU backend: splits [0, n) into contiguous
// chunks over std::thread workers. Deterministic: which thread computes an
// index never changes its result.
#pragma once

#include <cstdint>
#include <functional>

namespace moe::cpu {

// Number of worker threads (MOE_NUM_THREADS, else hardware_concurrency).
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n); chunks hold at
// least min_chunk indices. Runs inline when one chunk suffices. Exceptions
// thrown by fn are rethrown on the calling thread.
void parallel_for(int64_t n, int64_t min_chunk,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace moe::cpu
