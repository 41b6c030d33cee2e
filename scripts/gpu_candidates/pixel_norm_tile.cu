// Candidate for csrc/cuda/pixel_norm.cu, NCHW path; not part of genkern._C until an H100 run shows it
// correct and faster (scripts/gpu_candidates/README.md). Maths as csrc/pixel_norm.h.
//
// Why: the shipped NCHW kernel gives each thread one position and walks its C channels twice (sum of
// squares, then y). All its resident threads together span the whole tensor before any starts its
// second walk, so x comes from DRAM twice: 55% of copy bandwidth at 32x512x64x64 fp32 on the H100
// (README, Results (H100)). Here a block owns a tile of TP consecutive positions of one sample over all
// C channels, keeps it in shared memory, and reads x from DRAM once (backward: x and dy once).
//
// Layout of a tile: [C][TP] elements, TP * sizeof(T) = kTileBytes (64 or 128: two or four 32-byte
// sectors per channel row). A thread moves V consecutive positions per access (V = 1, or 16 bytes) and
// always the same V positions of the tile, so it accumulates their sums in registers while it loads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/vec_pack.cuh"
#include "dispatch.h"
#include "pixel_norm.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
using Pack = VecPack<T, V>;

// Which V positions (q) and which first channel row (c0) thread t handles, and the channel stride.
template <int TP, int V>
struct TileThread {
  static constexpr int kPerRow = TP / V;              // threads across one channel row
  static constexpr int kRowsPerPass = kThreads / kPerRow;
  int q, c0;
  __device__ TileThread() : q((threadIdx.x % kPerRow) * V), c0(threadIdx.x / kPerRow) {}
};

// The V positions' sums over the block: part holds kThreads * V floats; on return out[j] (shared,
// TP floats) is the sum for tile position j. Threads t < kPerRow reduce the kRowsPerPass partials of
// their positions.
template <int TP, int V>
__device__ void tile_sums(const float (&s)[V], float* part, float* out) {
  using Th = TileThread<TP, V>;
#pragma unroll
  for (int j = 0; j < V; ++j) part[threadIdx.x * V + j] = s[j];
  __syncthreads();
  if (threadIdx.x < Th::kPerRow) {
    float tot[V] = {};
    for (int k = threadIdx.x; k < kThreads; k += Th::kPerRow)
#pragma unroll
      for (int j = 0; j < V; ++j) tot[j] += part[k * V + j];
#pragma unroll
    for (int j = 0; j < V; ++j) out[threadIdx.x * V + j] = tot[j];
  }
  __syncthreads();
}

// The forward and the backward open with the same few lines (this block's tile, the thread's offset):
// folded into TileThread, they took two 16-byte variants of the backward to 64 registers and a spill.
template <typename T, int TP, int V>
__global__ void __launch_bounds__(kThreads) forward_tile(const T* __restrict__ x, T* __restrict__ y,
                                                         float* __restrict__ rstd, int64_t C, int64_t P, float eps) {
  using Th = TileThread<TP, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* tile = reinterpret_cast<T*>(smem);
  __shared__ float part[kThreads * V];
  __shared__ float r_tile[TP];
  const int64_t tiles = (P + TP - 1) / TP;
  const int64_t n = blockIdx.x / tiles, p0 = (blockIdx.x - n * tiles) * TP;
  const Th th;
  const int64_t base = n * C * P + p0 + th.q;
  // V == 1 or P % V == 0 (the host checks), so a pack is either wholly inside the map or wholly past it
  const bool in = p0 + th.q < P;
  float s[V] = {};
#pragma unroll 4
  for (int64_t c = th.c0; c < C; c += Th::kRowsPerPass) {
    Pack<T, V> v{};
    if (in) v = *reinterpret_cast<const Pack<T, V>*>(x + base + c * P);
    *reinterpret_cast<Pack<T, V>*>(tile + c * TP + th.q) = v;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float f = static_cast<float>(v.v[j]);
      s[j] += f * f;
    }
  }
  tile_sums<TP, V>(s, part, r_tile);
  if (threadIdx.x < TP) {
    const float r = rsqrtf(r_tile[threadIdx.x] / static_cast<float>(C) + eps);
    r_tile[threadIdx.x] = r;  // only this thread reads or writes entry threadIdx.x here
    if (p0 + threadIdx.x < P) rstd[n * P + p0 + threadIdx.x] = r;
  }
  __syncthreads();
  if (!in) return;
  float r[V];
#pragma unroll
  for (int j = 0; j < V; ++j) r[j] = r_tile[th.q + j];
#pragma unroll 4
  for (int64_t c = th.c0; c < C; c += Th::kRowsPerPass) {
    Pack<T, V> v = *reinterpret_cast<const Pack<T, V>*>(tile + c * TP + th.q);
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = static_cast<T>(static_cast<float>(v.v[j]) * r[j]);
    *reinterpret_cast<Pack<T, V>*>(y + base + c * P) = v;
  }
}

template <typename T, int TP, int V>
__global__ void __launch_bounds__(kThreads) backward_tile(const T* __restrict__ dy, const T* __restrict__ x,
                                                          const float* __restrict__ rstd, T* __restrict__ dx,
                                                          int64_t C, int64_t P) {
  using Th = TileThread<TP, V>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* tx = reinterpret_cast<T*>(smem);
  T* tg = tx + C * TP;
  __shared__ float part[kThreads * V];
  __shared__ float dot_tile[TP];
  const int64_t tiles = (P + TP - 1) / TP;
  const int64_t n = blockIdx.x / tiles, p0 = (blockIdx.x - n * tiles) * TP;
  const Th th;
  const int64_t base = n * C * P + p0 + th.q;
  const bool in = p0 + th.q < P;
  float s[V] = {};
#pragma unroll 4
  for (int64_t c = th.c0; c < C; c += Th::kRowsPerPass) {
    Pack<T, V> a{}, g{};
    if (in) {
      a = *reinterpret_cast<const Pack<T, V>*>(x + base + c * P);
      g = *reinterpret_cast<const Pack<T, V>*>(dy + base + c * P);
    }
    *reinterpret_cast<Pack<T, V>*>(tx + c * TP + th.q) = a;
    *reinterpret_cast<Pack<T, V>*>(tg + c * TP + th.q) = g;
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] += static_cast<float>(a.v[j]) * static_cast<float>(g.v[j]);
  }
  tile_sums<TP, V>(s, part, dot_tile);
  if (!in) return;
  float r[V], k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    r[j] = rstd[n * P + p0 + th.q + j];
    k[j] = r[j] * r[j] * r[j] * dot_tile[th.q + j] / static_cast<float>(C);
  }
#pragma unroll 4
  for (int64_t c = th.c0; c < C; c += Th::kRowsPerPass) {
    const Pack<T, V> a = *reinterpret_cast<const Pack<T, V>*>(tx + c * TP + th.q);
    Pack<T, V> g = *reinterpret_cast<const Pack<T, V>*>(tg + c * TP + th.q);
#pragma unroll
    for (int j = 0; j < V; ++j)
      g.v[j] = static_cast<T>(r[j] * static_cast<float>(g.v[j]) - k[j] * static_cast<float>(a.v[j]));
    *reinterpret_cast<Pack<T, V>*>(dx + base + c * P) = g;
  }
}

// Raises kernel's dynamic shared-memory limit to at least `bytes`, only when it grows: the call is then
// made before a CUDA graph captures the launch (run.py times graph replays).
template <auto kKernel>
void allow_dynamic_smem(int bytes) {
  static int allowed = 48 << 10;  // one per kernel
  if (bytes > allowed) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    allowed = bytes;
  }
}

// Launches kernel<T, TP, V> over N * ceil(P / TP) tiles with `tensors` tiles of shared memory each.
template <typename T, int kTileBytes, bool kVec, typename Launch>
void launch_tile(const PixelNormShape& s, int tensors, const Launch& launch) {
  constexpr int TP = kTileBytes / static_cast<int>(sizeof(T));
  constexpr int V = kVec ? kPack16<T> : 1;
  TORCH_CHECK(!kVec || s.P % V == 0, "pixel_norm_tile: 16-byte accesses need prod(spatial) divisible by ", V);
  const int64_t smem = static_cast<int64_t>(tensors) * s.C * kTileBytes;
  static const int limit = [] {  // read once, before any CUDA graph captures a launch (run.py)
    int device = 0, bytes = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return bytes;
  }();
  TORCH_CHECK(smem + kThreads * V * 4 + TP * 4 <= limit, "pixel_norm_tile: C=", s.C, " needs ", smem,
              " bytes of shared memory per block, over the device's ", limit);
  const int64_t blocks = s.N * ((s.P + TP - 1) / TP);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "pixel_norm_tile: too many tiles");
  launch(std::integral_constant<int, TP>{}, std::integral_constant<int, V>{}, static_cast<int>(smem),
         static_cast<unsigned>(blocks));
}

// 16-byte accesses need every operand's data aligned to 16 bytes (a view may start anywhere).
void check_aligned(bool vec, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK(!vec || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0,
                "pixel_norm_tile: 16-byte accesses need 16-byte aligned data");
}

template <typename T, typename Fn>
void with_variant(int64_t tile_bytes, bool vec, const Fn& fn) {
  TORCH_CHECK(tile_bytes == 64 || tile_bytes == 128, "pixel_norm_tile: tile_bytes must be 64 or 128");
  if (tile_bytes == 64) {
    vec ? fn(std::integral_constant<int, 64>{}, std::true_type{}) : fn(std::integral_constant<int, 64>{}, std::false_type{});
  } else {
    vec ? fn(std::integral_constant<int, 128>{}, std::true_type{}) : fn(std::integral_constant<int, 128>{}, std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor> pixel_norm_tile(const at::Tensor& x_in, double eps, int64_t tile_bytes, bool vec) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PixelNormForwardCall call = prepare_pixel_norm_forward(x_in, eps);
  const PixelNormShape& s = call.s;
  TORCH_CHECK(!s.channels_last && s.P > 1, "pixel_norm_tile: NCHW inputs with spatial dims only");
  if (call.x.numel() == 0) return {call.y, call.rstd};
  check_aligned(vec, {&call.x, &call.y});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(call.x.scalar_type(), "pixel_norm_tile", [&] {
    with_variant<scalar_t>(tile_bytes, vec, [&](auto tb, auto v) {
      launch_tile<scalar_t, decltype(tb)::value, decltype(v)::value>(s, 1, [&](auto TP, auto V, int smem, unsigned blocks) {
        constexpr auto kernel = forward_tile<scalar_t, decltype(TP)::value, decltype(V)::value>;
        allow_dynamic_smem<kernel>(smem);
        kernel<<<blocks, kThreads, smem, stream>>>(call.x.const_data_ptr<scalar_t>(), call.y.mutable_data_ptr<scalar_t>(),
                                                   call.rstd.mutable_data_ptr<float>(), s.C, s.P, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {call.y, call.rstd};
}

at::Tensor pixel_norm_tile_backward(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& rstd,
                                    int64_t tile_bytes, bool vec) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto call = prepare_pixel_norm_backward(grad_y, x_in, rstd);
  const PixelNormShape& s = call.s;
  TORCH_CHECK(!s.channels_last && s.P > 1, "pixel_norm_tile_backward: NCHW inputs with spatial dims only");
  if (call.x.numel() == 0) return call.dx;
  check_aligned(vec, {&call.x, &call.dy, &call.dx});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(call.x.scalar_type(), "pixel_norm_tile_backward", [&] {
    with_variant<scalar_t>(tile_bytes, vec, [&](auto tb, auto v) {
      launch_tile<scalar_t, decltype(tb)::value, decltype(v)::value>(s, 2, [&](auto TP, auto V, int smem, unsigned blocks) {
        constexpr auto kernel = backward_tile<scalar_t, decltype(TP)::value, decltype(V)::value>;
        allow_dynamic_smem<kernel>(smem);
        kernel<<<blocks, kThreads, smem, stream>>>(call.dy.const_data_ptr<scalar_t>(), call.x.const_data_ptr<scalar_t>(),
                                                   call.rstd.const_data_ptr<float>(), call.dx.mutable_data_ptr<scalar_t>(),
                                                   s.C, s.P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return call.dx;
}

}  // namespace

TORCH_LIBRARY(genkern_candidates, m) {
  m.def("pixel_norm_tile(Tensor x, float eps, int tile_bytes, bool vec) -> (Tensor, Tensor)");
  m.def("pixel_norm_tile_backward(Tensor grad_y, Tensor x, Tensor rstd, int tile_bytes, bool vec) -> Tensor");
}

TORCH_LIBRARY_IMPL(genkern_candidates, CUDA, m) {
  m.impl("pixel_norm_tile", &pixel_norm_tile);
  m.impl("pixel_norm_tile_backward", &pixel_norm_tile_backward);
}

}  // namespace genkern::cuda
