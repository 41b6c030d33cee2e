// minibatch_stddev on CUDA. Maths and checks in csrc/minibatch_stddev.h; the same decomposition as the
// Triton kernels: a block owns one (column m, slice f) and a chunk of the slice's (channel, pixel)
// positions (pixel-major in channels-last memory), a thread one position: G loads for the mean, G for the variance (and the copy into out),
// one partial sum per block. Partials, statistic channels and the backward's coefficients are ATen ops.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_reduce.cuh"
#include "dispatch.h"
#include "minibatch_stddev.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

// Position j of a slice is (channel cc, pixel p) of its c * P: pixel-major in channels-last memory
// (cc fastest) and channel-major in NCHW (p fastest), so that neighbouring threads touch
// neighbouring addresses in both layouts.
struct Geo {
  int64_t M, F, c, P, G, sxN, sxC, sxP, soN, soC, soP;
  bool channels_last;
  __device__ __forceinline__ void split(int64_t j, int64_t& cc, int64_t& p) const {
    if (channels_last) {
      p = j / c;
      cc = j - p * c;
    } else {
      cc = j / P;
      p = j - cc * P;
    }
  }
  __device__ __forceinline__ int64_t x_off(int64_t i, int64_t f, int64_t j) const {
    int64_t cc, p;
    split(j, cc, p);
    return i * sxN + (f * c + cc) * sxC + p * sxP;
  }
  __device__ __forceinline__ int64_t o_off(int64_t i, int64_t f, int64_t j) const {
    int64_t cc, p;
    split(j, cc, p);
    return i * soN + (f * c + cc) * soC + p * soP;
  }
};

Geo make_geo(const MbstdShape& s, const at::Tensor& x, const at::Tensor& o) {
  return {s.M, s.F, s.c, s.P, s.G, x.stride(0), x.stride(1), x.stride(3),
          o.stride(0), o.stride(1), o.stride(3), s.channels_last};
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ out, float* __restrict__ part, Geo g,
                               float eps) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t mf = blockIdx.x, m = mf / g.F, f = mf - m * g.F;
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  float s = 0.f;
  if (j < g.c * g.P) {
    float mean = 0.f;
    for (int64_t k = 0; k < g.G; ++k) {
      const int64_t i = k * g.M + m;
      const T v = x[g.x_off(i, f, j)];
      out[g.o_off(i, f, j)] = v;
      mean += static_cast<float>(v);
    }
    mean /= g.G;
    float var = 0.f;
    for (int64_t k = 0; k < g.G; ++k) {
      const float d = static_cast<float>(x[g.x_off(k * g.M + m, f, j)]) - mean;
      var += d * d;
    }
    s = sqrtf(var / g.G + eps);
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) part[mf * gridDim.y + blockIdx.y] = s;
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ go, const T* __restrict__ x, const float* __restrict__ coef,
                                T* __restrict__ dx, Geo g, float eps) {
  const int64_t mf = blockIdx.x, m = mf / g.F, f = mf - m * g.F;
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= g.c * g.P) return;
  float mean = 0.f;
  for (int64_t k = 0; k < g.G; ++k) mean += static_cast<float>(x[g.x_off(k * g.M + m, f, j)]);
  mean /= g.G;
  float var = 0.f;
  for (int64_t k = 0; k < g.G; ++k) {
    const float d = static_cast<float>(x[g.x_off(k * g.M + m, f, j)]) - mean;
    var += d * d;
  }
  const float scale = coef[mf] * rsqrtf(var / g.G + eps);
  for (int64_t k = 0; k < g.G; ++k) {
    const int64_t i = k * g.M + m, xo = g.x_off(i, f, j);
    dx[xo] = static_cast<T>(static_cast<float>(go[g.o_off(i, f, j)]) + scale * (static_cast<float>(x[xo]) - mean));
  }
}

dim3 grid_for(const MbstdShape& s) {
  return dim3(static_cast<unsigned>(s.M * s.F), static_cast<unsigned>((s.c * s.P + kThreads - 1) / kThreads));
}

at::Tensor minibatch_stddev_cuda(const at::Tensor& x_in, int64_t group_size, int64_t num_channels, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev");
  TORCH_CHECK_VALUE(s.M * s.F < (int64_t{1} << 31) && (s.c * s.P + kThreads - 1) / kThreads < 65536,
                    "minibatch_stddev: x is too large for the CUDA grid");
  const auto x = x_in.contiguous(mbstd_format(s));
  auto out = at::empty({s.N, s.C + s.F, x.size(2), x.size(3)}, x.options().memory_format(mbstd_format(s)));
  const dim3 grid = grid_for(s);
  auto part = at::empty({s.M * s.F, grid.y}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_cuda", [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                           out.mutable_data_ptr<scalar_t>(),
                                                           part.mutable_data_ptr<float>(), make_geo(s, x, out),
                                                           static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto stat = part.sum(1, false, at::kDouble).div_(static_cast<double>(s.c * s.P)).to(at::kFloat).view({s.M, s.F});
  mbstd_fill_stats(out, stat, s);
  return out;
}

at::Tensor minibatch_stddev_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in, int64_t group_size,
                                          int64_t num_channels, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto s = mbstd_shape(x_in, group_size, num_channels, eps, "minibatch_stddev_backward");
  check_mbstd_grad(grad_out, x_in, s);
  const auto x = x_in.contiguous(mbstd_format(s));
  const auto go = grad_out.contiguous(mbstd_format(s));
  auto dx = at::empty_like(x);
  const auto coef = mbstd_grad_coef(go, s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "minibatch_stddev_backward_cuda", [&] {
    backward_kernel<scalar_t><<<grid_for(s), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), coef.const_data_ptr<float>(),
        dx.mutable_data_ptr<scalar_t>(), make_geo(s, x, go), static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("minibatch_stddev", &minibatch_stddev_cuda);
  m.impl("minibatch_stddev_backward", &minibatch_stddev_backward_cuda);
}

}  // namespace genkern::cuda
