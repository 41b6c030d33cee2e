// Work distribution for the CPU kernels.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace genkern::cpu {

// Blocks per claim for the functions below: about kRunBytes of a block's main operand, and at least
// eight claims per thread, so that a worker that wakes late (tens of microseconds after a serial
// stretch of the program) still takes fewer blocks instead of the caller waiting for its share.
// Claims of one block each cost twice: workers that alternate block by block each read every other
// small block, which the hardware prefetchers follow badly, and the two cores pass the counter's
// cache line back and forth once per block (2 threads, same-process A/B: GroupNorm+SiLU forward
// with 4 KB groups, 64x128x16x16, 0.91-0.94 -> 0.76-0.80 ms; ddpm_step with in-kernel noise,
// 32x3x128x128, 2.1-2.3 -> 1.7 ms).
constexpr int64_t kRunBytes = 256 << 10;
inline int64_t run_length(int64_t blocks, int64_t block_bytes) {
  const int64_t by_bytes = kRunBytes / std::max<int64_t>(1, block_bytes);
  return std::clamp<int64_t>(std::min(by_bytes, blocks / (8 * at::get_num_threads())), 1, blocks);
}

// Shared by both: each worker takes `run` consecutive blocks per claim from a shared counter.
// next_block(b) returns the block after b for this worker (-1 when none is left).
class BlockClaims {
 public:
  BlockClaims(std::atomic<int64_t>& counter, int64_t blocks, int64_t run)
      : counter_(counter), blocks_(blocks), run_(run) {}
  int64_t next_block(int64_t b) {
    if (b + 1 < end_) return b + 1;
    const int64_t first = counter_.fetch_add(run_, std::memory_order_relaxed);
    end_ = std::min(blocks_, first + run_);
    return first < blocks_ ? first : int64_t{-1};
  }

 private:
  std::atomic<int64_t>& counter_;
  int64_t blocks_, run_, end_ = 0;
};

// f(b) for every b in [0, blocks), handed out in runs (run_length) through a shared counter instead
// of split statically: idle OpenMP workers sleep, and one that wakes late then takes fewer. At most
// blocks / min_blocks_per_thread workers, so that tiny inputs do not wake the others.
template <typename F>
void parallel_blocks(int64_t blocks, int64_t min_blocks_per_thread, int64_t block_bytes, const F& f) {
  const int64_t tasks = std::clamp<int64_t>(blocks / std::max<int64_t>(1, min_blocks_per_thread), 1,
                                            at::get_num_threads());
  const int64_t run = run_length(blocks, block_bytes);
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    BlockClaims claims(counter, blocks, run);
    for (int64_t b = claims.next_block(-1); b >= 0; b = claims.next_block(b)) f(b);
  });
}

// parallel_blocks for kernels that prefetch: f(b, next) where `next` is the block this worker runs
// after b (-1 if none). A worker claims its next block before it starts the current one, so that f
// can fetch next's inputs from memory while it computes on b's (a compute-bound pass of one block
// then hides the memory-bound pass of the next).
template <typename F>
void parallel_blocks_ahead(int64_t blocks, int64_t block_bytes, const F& f) {
  const int64_t tasks = std::clamp<int64_t>(blocks, 1, at::get_num_threads());
  const int64_t run = run_length(blocks, block_bytes);
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    BlockClaims claims(counter, blocks, run);
    for (int64_t b = claims.next_block(-1); b >= 0;) {
      const int64_t next = claims.next_block(b);
      f(b, next);
      b = next;
    }
  });
}

}  // namespace genkern::cpu
