// pixel_norm on CUDA. Maths and checks in csrc/pixel_norm.h.
// NCHW: one thread per position walks the C channels (neighbouring threads read neighbouring
// positions: coalesced). Channels-last and [N, C]: one warp per row of C contiguous channels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_reduce.cuh"
#include "dispatch.h"
#include "pixel_norm.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_cols(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ rstd, int64_t N,
                             int64_t C, int64_t P, float eps) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= N * P) return;
  const int64_t n = t / P, p = t - n * P, base = n * C * P + p;
  float s = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[base + c * P]);
    s += v * v;
  }
  const float r = rsqrtf(s / C + eps);
  rstd[t] = r;
  for (int64_t c = 0; c < C; ++c) y[base + c * P] = static_cast<T>(static_cast<float>(x[base + c * P]) * r);
}

template <typename T>
__global__ void backward_cols(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ rstd,
                              T* __restrict__ dx, int64_t N, int64_t C, int64_t P) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= N * P) return;
  const int64_t n = t / P, p = t - n * P, base = n * C * P + p;
  float dot = 0.f;
  for (int64_t c = 0; c < C; ++c) dot += static_cast<float>(dy[base + c * P]) * static_cast<float>(x[base + c * P]);
  const float r = rstd[t], k = r * r * r * dot / C;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t o = base + c * P;
    dx[o] = static_cast<T>(r * static_cast<float>(dy[o]) - k * static_cast<float>(x[o]));
  }
}

template <typename T>
__global__ void forward_rows(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ rstd, int64_t rows,
                             int64_t C, float eps) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const T* xr = x + row * C;
  float s = 0.f;
  for (int64_t c = lane; c < C; c += kWarp) {
    const float v = static_cast<float>(xr[c]);
    s += v * v;
  }
  const float r = rsqrtf(warp_sum(s) / C + eps);
  if (lane == 0) rstd[row] = r;
  for (int64_t c = lane; c < C; c += kWarp) y[row * C + c] = static_cast<T>(static_cast<float>(xr[c]) * r);
}

template <typename T>
__global__ void backward_rows(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ rstd,
                              T* __restrict__ dx, int64_t rows, int64_t C) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int64_t o = row * C;
  float dot = 0.f;
  for (int64_t c = lane; c < C; c += kWarp) dot += static_cast<float>(dy[o + c]) * static_cast<float>(x[o + c]);
  const float r = rstd[row], k = r * r * r * warp_sum(dot) / C;
  for (int64_t c = lane; c < C; c += kWarp)
    dx[o + c] = static_cast<T>(r * static_cast<float>(dy[o + c]) - k * static_cast<float>(x[o + c]));
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

std::tuple<at::Tensor, at::Tensor> pixel_norm_cuda(const at::Tensor& x_in, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PixelNormForwardCall call = prepare_pixel_norm_forward(x_in, eps);
  const at::Tensor &x = call.x, &y = call.y, &rstd = call.rstd;
  const PixelNormShape& s = call.s;
  if (x.numel() == 0) return {y, rstd};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool rows = s.channels_last || s.P == 1;
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pixel_norm_cuda", [&] {
    if (rows)
      forward_rows<scalar_t><<<blocks_for(s.N * s.P * kWarp), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>(), s.N * s.P,
          s.C, static_cast<float>(eps));
    else
      forward_cols<scalar_t><<<blocks_for(s.N * s.P), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>(), s.N, s.C,
          s.P, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

at::Tensor pixel_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& rstd_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto call = prepare_pixel_norm_backward(grad_y, x_in, rstd_in);
  const auto &x = call.x, &dy = call.dy, &rstd = call.rstd;
  const auto& s = call.s;
  auto& dx = call.dx;
  if (x.numel() == 0) return dx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool rows = s.channels_last || s.P == 1;
  GENKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "pixel_norm_backward_cuda", [&] {
    if (rows)
      backward_rows<scalar_t><<<blocks_for(s.N * s.P * kWarp), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rstd.const_data_ptr<float>(),
          dx.mutable_data_ptr<scalar_t>(), s.N * s.P, s.C);
    else
      backward_cols<scalar_t><<<blocks_for(s.N * s.P), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rstd.const_data_ptr<float>(),
          dx.mutable_data_ptr<scalar_t>(), s.N, s.C, s.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("pixel_norm", &pixel_norm_cuda);
  m.impl("pixel_norm_backward", &pixel_norm_backward_cuda);
}

}  // namespace genkern::cuda
