// gradient_penalty on CUDA. Maths and checks in csrc/gradient_penalty.h.
// Forward: a block sums the squares of one chunk of one sample (a contiguous block of memory in the
// elementwise layout); per-sample norms and the loss from the partials are ATen ops. Backward: one pass.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_reduce.cuh"
#include "dispatch.h"
#include "gradient_penalty.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * kThreads;

template <typename T>
__global__ void sumsq_kernel(const T* __restrict__ g, float* __restrict__ part, int64_t per) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t i = blockIdx.x, b = blockIdx.y * kChunk, e = min(per, b + kChunk);
  float s = 0.f;
  for (int64_t k = b + threadIdx.x; k < e; k += blockDim.x) {
    const float v = static_cast<float>(g[i * per + k]);
    s += v * v;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) part[i * gridDim.y + blockIdx.y] = s;
}

template <typename T>
__global__ void scale_kernel(const T* __restrict__ g, const float* __restrict__ scale, T* __restrict__ out,
                             int64_t n, int64_t per) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[k] = static_cast<T>(scale[k / per] * static_cast<float>(g[k]));
}

std::tuple<at::Tensor, at::Tensor> gradient_penalty_cuda(const at::Tensor& grad_in, double weight,
                                                         std::optional<double> target) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_gradient_penalty(grad_in, weight, target, "gradient_penalty");
  const auto g = to_strides(grad_in, elementwise_strides(grad_in));
  const int64_t N = g.size(0), per = g.numel() / N, chunks = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31) && chunks < 65536, "gradient_penalty: grad is too large for the CUDA grid");
  auto part = at::zeros({N, chunks}, g.options().dtype(at::kFloat));
  if (per > 0) {
    GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_cuda", [&] {
      sumsq_kernel<scalar_t><<<dim3(static_cast<unsigned>(N), static_cast<unsigned>(chunks)), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(g.const_data_ptr<scalar_t>(),
                                                                    part.mutable_data_ptr<float>(), per);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto norms = part.sum(1, false, at::kDouble).sqrt().to(at::kFloat);
  return {penalty_from_norms(norms, weight, target), norms};
}

at::Tensor gradient_penalty_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_in,
                                          const at::Tensor& norms, double weight, std::optional<double> target) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_gradient_penalty_backward(grad_loss, grad_in, norms, weight, target);
  const auto strides = elementwise_strides(grad_in);
  const auto g = to_strides(grad_in, strides);
  auto dg = at::empty_strided(g.sizes(), strides, g.options());
  const int64_t n = g.numel();
  if (n == 0) return dg;
  const auto scale = penalty_grad_scale(grad_loss, norms, weight, target);
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_backward_cuda", [&] {
    const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20));
    scale_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), dg.mutable_data_ptr<scalar_t>(), n,
        n / g.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dg;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("gradient_penalty", &gradient_penalty_cuda);
  m.impl("gradient_penalty_backward", &gradient_penalty_backward_cuda);
}

}  // namespace genkern::cuda
