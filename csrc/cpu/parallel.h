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

}  // namespace genkern::cpu
