// group_norm_silu on CUDA. Maths in csrc/group_norm_silu.h; the same decomposition as the Triton
// kernels (genkern/triton/group_norm_silu.py): x is addressed as [N, HW, C] through strides so NCHW
// and channels-last share the kernels, and each block owns one (sample, group) and a chunk of pixels,
// so that small batches and num_groups = 1 still fill the GPU.
//   forward:  on Hopper, one pass with a thread-block cluster per group (group_norm_silu_cluster.cuh);
//             elsewhere stats (partial shifted sums per chunk) -> apply (combine, write y, mean, rstd)
//   backward: on Hopper, one pass on the same clusters; elsewhere
//             grad_sums (per-channel partials) -> grad_coef ([N, C] coefficients) -> grad_apply (dx)
//             -> param_grads (dweight, dbias)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation.h"
#include "cuda/block_reduce.cuh"
#include "cuda/group_norm_silu_cluster.cuh"
#include "cuda/vec_pack.cuh"
#include "dispatch.h"
#include "group_norm_silu.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;
// The one-pass kernels' minimum of resident CTAs per SM (__launch_bounds__: at most 40 registers a
// thread). ptxas (CUDA 13.0, sm_90, the build's flags) left to itself gave the backward 62-64 registers
// (with the layout a template argument, 56-90, and the forward 60-124 from 40-49), which holds an SM to
// two CTAs of 512 threads where shared memory has room for three; each CTA loads, then waits on its
// cluster, then stores, so a third keeps more loads in flight. At 40 nothing spills in the SiLU and None
// kernels; the channels-last GeLU backward and the float16 channels-last SiLU backward spill 24-132
// bytes. scripts/gpu_candidates/group_norm_silu_tuning.cu times 1 and 2 against it on the GPU.
constexpr int kClusterMinBlocks = 3;
constexpr int64_t kChunkElems = 16384;  // elements per block (a chunk of pixels of one group)
constexpr int64_t kMaxChunks = 65535;   // gridDim.y limit

struct Geometry {
  int64_t HW, C, D, G, sN, sP, sC, chunk_p;
  int n_chunks;
  bool channels_last;

  __device__ __forceinline__ int64_t base(int64_t ng) const { return (ng / G) * sN + (ng % G) * D * sC; }
  __device__ __forceinline__ int64_t p_lo() const { return blockIdx.y * chunk_p; }
  __device__ __forceinline__ int64_t pixels() const { return min(HW, p_lo() + chunk_p) - p_lo(); }
  // Offset of the i-th element of this block's chunk, and its channel within the group.
  // NCHW walks pixels fastest, channels-last channels fastest: both coalesce.
  __device__ __forceinline__ int64_t offset(int64_t i, int64_t L, int64_t& d) const {
    int64_t p;
    if (channels_last) {
      p = i / D;
      d = i - p * D;
    } else {
      d = i / L;
      p = i - d * L;
    }
    return (p_lo() + p) * sP + d * sC;
  }
};

Geometry make_geometry(const GroupNormShape& s) {
  Geometry g;
  g.HW = s.HW;
  g.C = s.C;
  g.D = s.D;
  g.G = s.G;
  g.channels_last = s.channels_last;
  g.sN = s.HW * s.C;
  g.sP = s.channels_last ? s.C : 1;
  g.sC = s.channels_last ? 1 : s.HW;
  g.chunk_p = std::max<int64_t>(std::max<int64_t>(1, kChunkElems / s.D), (s.HW + kMaxChunks - 1) / kMaxChunks);
  g.n_chunks = static_cast<int>((s.HW + g.chunk_p - 1) / g.chunk_p);
  return g;
}

// ---- NCHW fast path -----------------------------------------------------------------------------
// In NCHW a group is one contiguous run of D*HW elements. When HW is a multiple of the 16-byte vector
// width, every vector lies inside one channel, so the kernels read and write 16 bytes per access and
// index with 32-bit flat offsets (the generic kernels' per-element 64-bit division held them to ~40%
// of copy bandwidth on an H100). Same stats layout as the generic path: partial sums shifted by x[base]
// (add_shifted, stats_from_shifted: group_norm_silu_cluster.cuh).
template <typename T>
using Pack = VecPack<T, kPack16<T>>;

// The block's shifted sums, reduced over the block, into this chunk's slot of part.
__device__ __forceinline__ void store_partial_sums(float s1, float s2, float* __restrict__ part, int64_t ng,
                                                   int n_chunks, float* scratch) {
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    part[(ng * n_chunks + blockIdx.y) * 2] = s1;
    part[(ng * n_chunks + blockIdx.y) * 2 + 1] = s2;
  }
}

struct FlatGeometry {
  int len, chunk, n_chunks, HW, G, D;
};

bool use_flat(const GroupNormShape& s, const at::Tensor& x) {
  const int64_t vec = 16 / x.element_size();
  return !s.channels_last && s.HW % vec == 0 && s.D * s.HW < (int64_t{1} << 30) &&
         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
}

FlatGeometry make_flat_geometry(const GroupNormShape& s, int64_t vec) {
  FlatGeometry g;
  g.len = static_cast<int>(s.D * s.HW);
  const int64_t need = (g.len + kMaxChunks - 1) / kMaxChunks;
  g.chunk = static_cast<int>(std::max<int64_t>(kChunkElems, (need + vec - 1) / vec * vec));
  g.n_chunks = (g.len + g.chunk - 1) / g.chunk;
  g.HW = static_cast<int>(s.HW);
  g.G = static_cast<int>(s.G);
  g.D = static_cast<int>(s.D);
  return g;
}

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, float* __restrict__ part, FlatGeometry g) {
  constexpr int V = kPack16<T>;
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x;
  const T* xg = x + ng * g.len;
  const float pivot = static_cast<float>(xg[0]);
  const int lo = blockIdx.y * g.chunk, hi = min(g.len, lo + g.chunk);
  float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
  for (int i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    add_shifted(*reinterpret_cast<const Pack<T>*>(xg + i), pivot, s1, s2);
  }
  store_partial_sums(s1, s2, part, ng, g.n_chunks, scratch);
}

// The group's mean and rstd from its chunks' shifted partial sums (every block of the group does it).
__device__ __forceinline__ void combine_stats(const float* __restrict__ part, int64_t ng, int n_chunks, float count,
                                              float pivot, float eps, float* scratch, float& mean, float& rstd) {
  float t1 = 0.f, t2 = 0.f;
  for (int j = threadIdx.x; j < n_chunks; j += blockDim.x) {
    t1 += part[(ng * n_chunks + j) * 2];
    t2 += part[(ng * n_chunks + j) * 2 + 1];
  }
  t1 = block_sum(t1, scratch);
  t2 = block_sum(t2, scratch);
  stats_from_shifted(t1, t2, count, pivot, eps, mean, rstd);
}

template <typename T, Activation A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                  const float* __restrict__ b, const float* __restrict__ part,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out, FlatGeometry g,
                                  float eps) {
  constexpr int V = kPack16<T>;
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x;
  const T* xg = x + ng * g.len;
  T* yg = y + ng * g.len;
  float mean, rstd;
  combine_stats(part, ng, g.n_chunks, static_cast<float>(g.len), static_cast<float>(xg[0]), eps, scratch, mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  const int c0 = static_cast<int>(ng % g.G) * g.D;
  const int lo = blockIdx.y * g.chunk, hi = min(g.len, lo + g.chunk);
#pragma unroll 4
  for (int i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    const int c = c0 + i / g.HW;
    const float a = rstd * w[c], bb = b[c];
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(xg + i);
    Pack<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(Act<A>::f((static_cast<float>(p.v[j]) - mean) * a + bb));
    *reinterpret_cast<Pack<T>*>(yg + i) = o;
  }
}


// ---- generic path (any layout, any HW) --------------------------------------------------------------
template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, float* __restrict__ part, Geometry g) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, base = g.base(ng), L = g.pixels();
  const float pivot = static_cast<float>(x[base]);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const float v = static_cast<float>(x[base + g.offset(i, L, d)]) - pivot;
    s1 += v;
    s2 += v * v;
  }
  store_partial_sums(s1, s2, part, ng, g.n_chunks, scratch);
}

template <typename T, Activation A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                             const float* __restrict__ b, const float* __restrict__ part,
                             float* __restrict__ mean_out, float* __restrict__ rstd_out, Geometry g, float eps) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  float mean, rstd;
  combine_stats(part, ng, g.n_chunks, static_cast<float>(g.HW * g.D), static_cast<float>(x[base]), eps, scratch,
                mean, rstd);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float u = (static_cast<float>(x[off]) - mean) * rstd * w[c0 + d] + b[c0 + d];
    y[off] = static_cast<T>(Act<A>::f(u));
  }
}

// part[n, k, c] = (sum du * (x - mean), sum du) over chunk k, du = dy * act'(u).
template <typename T, Activation A>
__global__ void grad_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ b, const float* __restrict__ mean_in,
                                 const float* __restrict__ rstd_in, float* __restrict__ part, Geometry g) {
  extern __shared__ float acc[];  // channels-last: 2 * D per-channel accumulators
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, n = ng / g.G, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  const float mean = mean_in[ng], rstd = rstd_in[ng];
  float* out = part + ((n * g.n_chunks + blockIdx.y) * g.C + c0) * 2;
  if (!g.channels_last) {
    // one channel at a time: its pixels are contiguous
    for (int64_t d = 0; d < g.D; ++d) {
      const float a = rstd * w[c0 + d], bb = b[c0 + d];
      float s1 = 0.f, s2 = 0.f;
      for (int64_t p = threadIdx.x; p < L; p += blockDim.x) {
        const int64_t off = base + (g.p_lo() + p) * g.sP + d * g.sC;
        const float xc = static_cast<float>(x[off]) - mean;
        const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * a + bb);
        s1 += du * xc;
        s2 += du;
      }
      s1 = block_sum(s1, scratch);
      s2 = block_sum(s2, scratch);
      if (threadIdx.x == 0) out[2 * d] = s1, out[2 * d + 1] = s2;
    }
    return;
  }
  for (int64_t j = threadIdx.x; j < 2 * g.D; j += blockDim.x) acc[j] = 0.f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float xc = static_cast<float>(x[off]) - mean;
    const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * rstd * w[c0 + d] + b[c0 + d]);
    atomicAdd(&acc[d], du * xc);
    atomicAdd(&acc[g.D + d], du);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < g.D; d += blockDim.x) out[2 * d] = acc[d], out[2 * d + 1] = acc[g.D + d];
}

// The [N, C]-sized algebra between the two passes (csrc/group_norm_silu.h), one block per (n, g): each
// channel's chunks of part added (dsc_c, db_c), the group's sums A M = sum_c w_c db_c and
// B M = sum_c w_c rstd dsc_c, then coef[n, c] = (rstd w_c, -rstd^2 B, -rstd A) for grad_apply and
// sums[n, c] = (rstd dsc_c, db_c), which param_grads_kernel adds over the batch into dweight and dbias.
// One launch where ATen took ~17 (sums, repeat, products, means, stack, casts).
__global__ void grad_coef_kernel(const float* __restrict__ part, const float* __restrict__ w,
                                 const float* __restrict__ rstd_in, float* __restrict__ coef,
                                 float* __restrict__ sums, Geometry g) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t ng = blockIdx.x, n = ng / g.G, c0 = (ng % g.G) * g.D;
  const float rstd = rstd_in[ng];
  float sa = 0.f, sb = 0.f;
  for (int64_t d = threadIdx.x; d < g.D; d += blockDim.x) {
    float dsc = 0.f, db = 0.f;
#pragma unroll 4
    for (int k = 0; k < g.n_chunks; ++k) {
      const float* p = part + ((n * g.n_chunks + k) * g.C + c0 + d) * 2;
      dsc += p[0];
      db += p[1];
    }
    const float wc = w[c0 + d];
    sa += wc * db;
    sb += wc * rstd * dsc;
    sums[(n * g.C + c0 + d) * 2] = rstd * dsc;
    sums[(n * g.C + c0 + d) * 2 + 1] = db;
  }
  sa = block_sum(sa, scratch);
  sb = block_sum(sb, scratch);
  const float inv_m = 1.f / static_cast<float>(g.HW * g.D);
  const float k2 = -rstd * rstd * sb * inv_m, k3 = -rstd * sa * inv_m;
  for (int64_t d = threadIdx.x; d < g.D; d += blockDim.x) {
    float* k = coef + (n * g.C + c0 + d) * 3;
    k[0] = rstd * w[c0 + d];
    k[1] = k2;
    k[2] = k3;
  }
}

// dx = k1 * du + k2 * (x - mean) + k3, coef[n, c] = (k1, k2, k3).
template <typename T, Activation A>
__global__ void grad_apply_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                  const float* __restrict__ w, const float* __restrict__ b,
                                  const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                  const float* __restrict__ coef, Geometry g) {
  const int64_t ng = blockIdx.x, n = ng / g.G, base = g.base(ng), L = g.pixels(), c0 = (ng % g.G) * g.D;
  const float mean = mean_in[ng], rstd = rstd_in[ng];
  for (int64_t i = threadIdx.x; i < L * g.D; i += blockDim.x) {
    int64_t d;
    const int64_t off = base + g.offset(i, L, d);
    const float* k = coef + (n * g.C + c0 + d) * 3;
    const float xc = static_cast<float>(x[off]) - mean;
    const float du = static_cast<float>(dy[off]) * Act<A>::df(xc * rstd * w[c0 + d] + b[c0 + d]);
    dx[off] = static_cast<T>(k[0] * du + k[1] * xc + k[2]);
  }
}

// stats then apply; the kernels are overloaded on the geometry (FlatGeometry: the NCHW fast path).
template <typename Geo>
void launch_forward(const ForwardCall& c, const at::Tensor& w, const at::Tensor& b, const Geo& geo, double eps) {
  at::Tensor part = at::empty({c.s.N * c.s.G, geo.n_chunks, 2}, c.x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(c.s.N * c.s.G), geo.n_chunks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_cuda", [&] {
    stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(c.x.const_data_ptr<scalar_t>(),
                                                          part.mutable_data_ptr<float>(), geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      apply_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
          c.x.const_data_ptr<scalar_t>(), c.y.mutable_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>(), part.const_data_ptr<float>(), c.mean.mutable_data_ptr<float>(),
          c.rstd.mutable_data_ptr<float>(), geo, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  ForwardCall c = prepare_forward(x_in, weight, bias, num_groups, eps, activation);
  if (c.x.numel() == 0) return {c.y, c.mean, c.rstd};
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(c.s, c.x);
  const SliceGeometry sg = make_slice_geometry(c.s, c.x, vec, kSliceBytes);
  if (sg.k > 0) {
    cluster_forward<kClusterMinBlocks>(c, w, b, sg, vec, eps);
  } else if (use_flat(c.s, c.x)) {
    launch_forward(c, w, b, make_flat_geometry(c.s, 16 / c.x.element_size()), eps);
  } else {
    launch_forward(c, w, b, make_geometry(c.s), eps);
  }
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t num_groups, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardCall c = prepare_backward(grad_y, x_in, weight, bias, mean_in, rstd_in, num_groups, activation);
  const GroupNormShape& s = c.s;
  const auto opts = c.x.options();
  if (c.x.numel() == 0) {
    return {c.dx, at::zeros({s.C}, opts.dtype(c.weight_grad_dtype)), at::zeros({s.C}, opts.dtype(c.bias_grad_dtype))};
  }
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(s, c.x, c.dy);
  const SliceGeometry sg = make_grad_slice_geometry(s, c.x, vec);
  // the cluster kernel's dweight/dbias and the two-pass channels-last partial sums (dx's too) add up
  // through shared-memory atomics; genkern.group_norm_silu picks the triton backend in deterministic mode
  constexpr const char* kNondeterministic =
      "genkern::group_norm_silu_backward on CUDA (its channel sums use shared-memory atomics; the triton and "
      "reference backends are deterministic: genkern.use_backend(\"triton\"))";
  if (sg.k > 0 || s.channels_last) at::globalContext().alertNotDeterministic(kNondeterministic);
  if (sg.k > 0) {
    auto [dw, db] = cluster_backward<kClusterMinBlocks>(c, w, b, sg, vec);
    return {c.dx, dw, db};
  }
  const Geometry geo = make_geometry(s);
  at::Tensor part = at::empty({s.N, geo.n_chunks, s.C, 2}, opts.dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(s.N * s.G), geo.n_chunks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t shmem = s.channels_last ? 2 * s.D * sizeof(float) : 0;
  TORCH_CHECK(shmem <= 48 * 1024, "group_norm_silu_backward: too many channels per group (", s.D,
              ") for the channels-last CUDA kernel; use the triton backend");
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      grad_sums_kernel<scalar_t, A><<<grid, kThreads, shmem, stream>>>(
          c.dy.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(), c.rstd.const_data_ptr<float>(),
          part.mutable_data_ptr<float>(), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  at::Tensor coef = at::empty({s.N, s.C, 3}, opts.dtype(at::kFloat));
  // laid out as the cluster path's part[N, G, k = 1, D, 2], so that param_grads takes both
  at::Tensor sums = at::empty({s.N, s.C, 2}, opts.dtype(at::kFloat));
  grad_coef_kernel<<<static_cast<unsigned>(s.N * s.G), kThreads, 0, stream>>>(
      part.const_data_ptr<float>(), w.const_data_ptr<float>(), c.rstd.const_data_ptr<float>(),
      coef.mutable_data_ptr<float>(), sums.mutable_data_ptr<float>(), geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  GENKERN_DISPATCH_FLOAT_TYPES(c.x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
    dispatch_activation(c.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      grad_apply_kernel<scalar_t, A><<<grid, kThreads, 0, stream>>>(
          c.dy.const_data_ptr<scalar_t>(), c.x.const_data_ptr<scalar_t>(), c.dx.mutable_data_ptr<scalar_t>(),
          w.const_data_ptr<float>(), b.const_data_ptr<float>(), c.mean.const_data_ptr<float>(),
          c.rstd.const_data_ptr<float>(), coef.const_data_ptr<float>(), geo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  auto [dw, db] = param_grads(sums, s, 1, c.weight_grad_dtype, c.bias_grad_dtype);
  return {c.dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward);
}

}  // namespace genkern::cuda
