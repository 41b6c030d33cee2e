// gradient_penalty on CUDA. Maths and checks in csrc/gradient_penalty.h (the per-sample formulas are
// shared with the CPU kernels).
// Forward: a block sums the squares of one chunk of one sample (a contiguous block of memory in the
// elementwise layout); one small block turns the partials into the norms and the loss. Backward: one
// pass, each block computing its sample's factor from the saved norm and dloss. Three launches for a
// forward and backward, where the ATen ops around the two kernels made ~19 (a zero fill, the partials'
// sum, square root and casts, the loss's five ops; the factors' seven): at discriminators' sizes the
// penalty is bound by launches, not bytes.
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
constexpr int64_t kChunk = 16 * kThreads;       // forward: values per block
constexpr int64_t kScaleChunk = 8 * kThreads;   // backward: values per block (more strided when a sample
                                                // needs more than 65535 blocks)

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

// norms[i] = sqrt(sum of sample i's partials), loss = weight mean_i term_i: one block, sums in double
// in a fixed order (deterministic).
__global__ void finalize_kernel(const float* __restrict__ part, float* __restrict__ norms, float* __restrict__ loss,
                                int64_t N, int64_t chunks, double weight, PenaltyTarget target) {
  __shared__ double terms[kThreads];
  double t = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += part[i * chunks + c];
    norms[i] = static_cast<float>(sqrt(s));
    t += penalty_term(s, target);
  }
  terms[threadIdx.x] = t;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) terms[threadIdx.x] += terms[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = static_cast<float>(weight * terms[0] / static_cast<double>(N));
}

// dg = f_i g over sample i = blockIdx.x, its blocks (blockIdx.y) striding through it;
// f_i = sample_scale(dloss 2 weight / N, n_i).
template <typename T>
__global__ void scale_kernel(const T* __restrict__ g, const float* __restrict__ grad_loss,
                             const float* __restrict__ norms, T* __restrict__ out, int64_t per, int64_t N,
                             double weight, PenaltyTarget target) {
  const int64_t i = blockIdx.x;
  const float f = sample_scale(static_cast<double>(grad_loss[0]) * 2.0 * weight / static_cast<double>(N), norms[i],
                               target);
  const T* gi = g + i * per;
  T* oi = out + i * per;
  for (int64_t k = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < per;
       k += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    oi[k] = static_cast<T>(f * static_cast<float>(gi[k]));
  }
}

std::tuple<at::Tensor, at::Tensor> gradient_penalty_cuda(const at::Tensor& grad_in, double weight,
                                                         std::optional<double> target) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_gradient_penalty(grad_in, weight, target, "gradient_penalty");
  const auto g = to_strides(grad_in, elementwise_strides(grad_in));
  const int64_t N = g.size(0), per = g.numel() / N, chunks = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31) && chunks < 65536, "gradient_penalty: grad is too large for the CUDA grid");
  // every slot is written (an empty sample's by a block that sums nothing)
  auto part = at::empty({N, chunks}, g.options().dtype(at::kFloat));
  auto norms = at::empty({N}, g.options().dtype(at::kFloat));
  auto loss = at::empty({}, g.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_cuda", [&] {
    sumsq_kernel<scalar_t><<<dim3(static_cast<unsigned>(N), static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), part.mutable_data_ptr<float>(), per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_kernel<<<1, kThreads, 0, stream>>>(part.const_data_ptr<float>(), norms.mutable_data_ptr<float>(),
                                              loss.mutable_data_ptr<float>(), N, chunks, weight,
                                              penalty_target(target));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, norms};
}

at::Tensor gradient_penalty_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_in,
                                          const at::Tensor& norms, double weight, std::optional<double> target) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_gradient_penalty_backward(grad_loss, grad_in, norms, weight, target);
  const auto strides = elementwise_strides(grad_in);
  const auto g = to_strides(grad_in, strides);
  auto dg = at::empty_strided(g.sizes(), strides, g.options());
  const int64_t N = g.size(0), per = g.numel() / N;
  if (per == 0) return dg;
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31), "gradient_penalty_backward: grad has too many samples for the CUDA grid");
  const int64_t blocks = std::min<int64_t>((per + kScaleChunk - 1) / kScaleChunk, 65535);  // per sample
  // on the device already (no copy), and read there: the host never waits for dloss
  const auto dloss = grad_loss.to(grad_in.device(), at::kFloat).reshape({1}).contiguous();
  const auto n = norms.contiguous();
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_backward_cuda", [&] {
    scale_kernel<scalar_t><<<dim3(static_cast<unsigned>(N), static_cast<unsigned>(blocks)), kThreads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), dloss.const_data_ptr<float>(), n.const_data_ptr<float>(),
        dg.mutable_data_ptr<scalar_t>(), per, N, weight, penalty_target(target));
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
