// Work distribution for the CPU kernels.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace genkern::cpu {

// f(b) for every b in [0, blocks), blocks handed out through a shared counter instead of split
// statically: idle OpenMP workers sleep, and one that wakes late (tens of microseconds after a
// serial stretch of the program) then takes fewer blocks instead of the caller waiting for its half.
template <typename F>
void parallel_blocks(int64_t blocks, int64_t min_blocks_per_thread, const F& f) {
  const int64_t tasks = std::clamp<int64_t>(blocks / std::max<int64_t>(1, min_blocks_per_thread), 1,
                                            at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed))
      f(b);
  });
}

// parallel_blocks for kernels that prefetch: f(b, next) where `next` is the block this worker runs
// after b (-1 if none). A worker claims its next block before it starts the current one, so that f
// can fetch next's inputs from memory while it computes on b's (a compute-bound pass of one block
// then hides the memory-bound pass of the next).
template <typename F>
void parallel_blocks_ahead(int64_t blocks, const F& f) {
  const int64_t tasks = std::clamp<int64_t>(blocks, 1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    auto claim = [&] {
      const int64_t b = next.fetch_add(1, std::memory_order_relaxed);
      return b < blocks ? b : int64_t{-1};
    };
    for (int64_t b = claim(); b >= 0;) {
      const int64_t after = claim();
      f(b, after);
      b = after;
    }
  });
}

}  // namespace genkern::cpu
