// Candidate for csrc/cuda/minibatch_stddev.cu; not part of genkern._C until an H100 run shows it correct
// and faster (scripts/gpu_candidates/README.md). Maths and checks as csrc/minibatch_stddev.h; the same
// decomposition as the shipped kernels: a block owns one (column m, slice f) and a chunk of the
// slice's (channel, pixel) positions, a thread its positions over the column's G samples.
//
// Why: the shipped kernels ran at 41-59% of copy bandwidth at 64x512x32x32 on the H100 (bf16 19-27%).
// Their PTX recomputes a position's (channel, pixel) split, a 64-bit division, in every iteration of
// each of the three loops over the G samples (3 G divisions per position; the compiler did not hoist
// them), and the forward's statistic channels take six small ATen launches after the kernel.
// Here each thread splits its position once, moves V consecutive positions per access (16 bytes where
// x's and out's rows allow it), and one small kernel turns the partial sums into the statistic
// channels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_reduce.cuh"
#include "cuda/vec_pack.cuh"
#include "dispatch.h"
#include "minibatch_stddev.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

struct Geo {
  int64_t M, F, c, P, G, sxN, sxC, sxP, soN, soC, soP;
  bool channels_last;
  // the offsets of position j of slice f in sample 0 of x and of out: split once per thread
  __device__ __forceinline__ void offsets(int64_t f, int64_t j, int64_t& xo, int64_t& oo) const {
    int64_t cc, p;
    if (channels_last) {
      p = j / c;
      cc = j - p * c;
    } else {
      cc = j / P;
      p = j - cc * P;
    }
    xo = (f * c + cc) * sxC + p * sxP;
    oo = (f * c + cc) * soC + p * soP;
  }
};

Geo make_geo(const MbstdShape& s, const at::Tensor& x, const at::Tensor& o) {
  return {s.M, s.F, s.c, s.P, s.G, x.stride(0), x.stride(1), x.stride(3),
          o.stride(0), o.stride(1), o.stride(3), s.channels_last};
}

// The mean and the sum of squared deviations over the column's G samples of the V positions at x's
// offset xo (within a sample); each sample's pack is also handed to first_walk(i, pack) as it is read.
template <typename T, int V, typename FirstWalk>
__device__ __forceinline__ void column_stats(const T* __restrict__ x, const Geo& g, int64_t m, int64_t xo,
                                             float (&mean)[V], float (&var)[V], const FirstWalk& first_walk) {
#pragma unroll
  for (int e = 0; e < V; ++e) mean[e] = var[e] = 0.f;
#pragma unroll 2
  for (int64_t k = 0; k < g.G; ++k) {
    const int64_t i = k * g.M + m;
    const auto v = *reinterpret_cast<const VecPack<T, V>*>(x + i * g.sxN + xo);
    first_walk(i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) mean[e] += static_cast<float>(v.v[e]);
  }
#pragma unroll
  for (int e = 0; e < V; ++e) mean[e] /= g.G;
#pragma unroll 2
  for (int64_t k = 0; k < g.G; ++k) {
    const auto v = *reinterpret_cast<const VecPack<T, V>*>(x + (k * g.M + m) * g.sxN + xo);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = static_cast<float>(v.v[e]) - mean[e];
      var[e] += d * d;
    }
  }
}

// V consecutive positions stay in one channel row (NCHW: P % V == 0) or one pixel (channels-last:
// c % V == 0) and are contiguous in x and out; the host picks V = 1 otherwise.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                           float* __restrict__ part, Geo g, float eps) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t mf = blockIdx.x, m = mf / g.F, f = mf - m * g.F;
  const int64_t j = (blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V;
  float s = 0.f;
  if (j < g.c * g.P) {
    int64_t xo, oo;
    g.offsets(f, j, xo, oo);
    float mean[V], var[V];
    column_stats<T, V>(x, g, m, xo, mean, var, [&](int64_t i, const VecPack<T, V>& v) {
      *reinterpret_cast<VecPack<T, V>*>(out + i * g.soN + oo) = v;  // the copy of x into out
    });
#pragma unroll
    for (int e = 0; e < V; ++e) s += sqrtf(var[e] / g.G + eps);
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) part[mf * gridDim.y + blockIdx.y] = s;
}

// out[i, C + f, :, :] = stat[i % M, f] = sum of part's row (m, f) / (c P), summed in double as the
// shipped host code does; one block per (sample, slice).
template <typename T>
__global__ void fill_stats_kernel(const float* __restrict__ part, int64_t parts, T* __restrict__ out, Geo g,
                                  int64_t N, int64_t C) {
  __shared__ double total;
  const int64_t i = blockIdx.x / g.F, f = blockIdx.x - i * g.F, m = i % g.M;
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int64_t b = 0; b < parts; ++b) t += part[(m * g.F + f) * parts + b];
    total = t;
  }
  __syncthreads();
  const T v = static_cast<T>(static_cast<float>(total / static_cast<double>(g.c * g.P)));
  for (int64_t p = threadIdx.x; p < g.P; p += blockDim.x) out[i * g.soN + (C + f) * g.soC + p * g.soP] = v;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) backward_kernel(const T* __restrict__ go, const T* __restrict__ x,
                                                            const float* __restrict__ coef, T* __restrict__ dx,
                                                            Geo g, float eps) {
  const int64_t mf = blockIdx.x, m = mf / g.F, f = mf - m * g.F;
  const int64_t j = (blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V;
  if (j >= g.c * g.P) return;
  int64_t xo, oo;
  g.offsets(f, j, xo, oo);
  float mean[V], var[V];
  column_stats<T, V>(x, g, m, xo, mean, var, [](int64_t, const VecPack<T, V>&) {});
  float scale[V];
#pragma unroll
  for (int e = 0; e < V; ++e) scale[e] = coef[mf] * rsqrtf(var[e] / g.G + eps);
#pragma unroll 2
  for (int64_t k = 0; k < g.G; ++k) {
    const int64_t i = k * g.M + m;
    const auto v = *reinterpret_cast<const VecPack<T, V>*>(x + i * g.sxN + xo);
    const auto d = *reinterpret_cast<const VecPack<T, V>*>(go + i * g.soN + oo);
    VecPack<T, V> r;
#pragma unroll
    for (int e = 0; e < V; ++e)
      r.v[e] = static_cast<T>(static_cast<float>(d.v[e]) + scale[e] * (static_cast<float>(v.v[e]) - mean[e]));
    *reinterpret_cast<VecPack<T, V>*>(dx + i * g.sxN + xo) = r;
  }
}

// 16-byte packs when every row a pack lies in is whole packs long and every tensor starts aligned.
template <typename T>
bool packs_fit(const MbstdShape& s, const at::Tensor& out, std::initializer_list<const at::Tensor*> ts) {
  constexpr int V = kPack16<T>;
  const bool rows = s.channels_last ? (s.c % V == 0 && s.C % V == 0 && (s.C + s.F) % V == 0) : s.P % V == 0;
  bool aligned = reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  for (const at::Tensor* t : ts) aligned &= reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  return rows && aligned;
}

dim3 grid_for(const MbstdShape& s, int V) {
  return dim3(static_cast<unsigned>(s.M * s.F), static_cast<unsigned>((s.c * s.P / V + kThreads - 1) / kThreads));
}

at::Tensor minibatch_stddev_flat(const at::Tensor& x_in, int64_t group_size, int64_t num_channels, double eps,
                                 bool vec) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev");
  const auto x = x_in.contiguous(mbstd_format(s));
  auto out = at::empty({s.N, s.C + s.F, x.size(2), x.size(3)}, x.options().memory_format(mbstd_format(s)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo geo = make_geo(s, x, out);
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_flat", [&] {
    const bool packs = vec && packs_fit<scalar_t>(s, out, {&x});
    const int V = packs ? kPack16<scalar_t> : 1;
    const dim3 grid = grid_for(s, V);
    TORCH_CHECK(s.M * s.F < (int64_t{1} << 31) && grid.y < 65536, "minibatch_stddev: x is too large for the CUDA grid");
    auto part = at::empty({s.M * s.F, grid.y}, x.options().dtype(at::kFloat));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                           part.mutable_data_ptr<float>(), geo, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    packs ? launch(forward_kernel<scalar_t, kPack16<scalar_t>>) : launch(forward_kernel<scalar_t, 1>);
    fill_stats_kernel<scalar_t><<<static_cast<unsigned>(s.N * s.F), kThreads, 0, stream>>>(
        part.const_data_ptr<float>(), grid.y, out.mutable_data_ptr<scalar_t>(), geo, s.N, s.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor minibatch_stddev_flat_backward(const at::Tensor& grad_out, const at::Tensor& x_in, int64_t group_size,
                                          int64_t num_channels, double eps, bool vec) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev_backward");
  check_mbstd_grad(grad_out, x_in, s);
  const auto x = x_in.contiguous(mbstd_format(s));
  const auto go = grad_out.contiguous(mbstd_format(s));
  auto dx = at::empty_like(x);
  const auto coef = mbstd_grad_coef(go, s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo geo = make_geo(s, x, go);
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_flat_backward", [&] {
    const bool packs = vec && packs_fit<scalar_t>(s, go, {&x, &dx});
    const int V = packs ? kPack16<scalar_t> : 1;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(s, V), kThreads, 0, stream>>>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                     coef.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
                                                     geo, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    packs ? launch(backward_kernel<scalar_t, kPack16<scalar_t>>) : launch(backward_kernel<scalar_t, 1>);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genkern_candidates, m) {
  m.def("minibatch_stddev_flat(Tensor x, int group_size, int num_channels, float eps, bool vec) -> Tensor");
  m.def("minibatch_stddev_flat_backward(Tensor grad_out, Tensor x, int group_size, int num_channels, float eps, "
        "bool vec) -> Tensor");
}

TORCH_LIBRARY_IMPL(genkern_candidates, CUDA, m) {
  m.impl("minibatch_stddev_flat", &minibatch_stddev_flat);
  m.impl("minibatch_stddev_flat_backward", &minibatch_stddev_flat_backward);
}

}  // namespace genkern::cuda
