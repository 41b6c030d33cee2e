// ddpm_step and add_noise on CUDA. Maths and checks in csrc/ddpm_step.h, the noise in csrc/philox.h.
// One thread owns one Philox group: 4 consecutive elements of memory, so one Philox call gives
// exactly the 4 normals it needs and the noise never touches memory. 64-bit indices throughout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm_step.h"
#include "dispatch.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Ptrs {
  const T *m, *mc, *x, *noise, *mask, *known;
  T* out;
};

template <typename T>
__global__ void ddpm_step_kernel(DdpmStepCoefs c, Ptrs<T> p, int64_t n, bool philox, uint64_t seed,
                                 uint64_t offset) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (philox) philox_normal4(seed, offset, static_cast<uint64_t>(g), z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * g + k;
      if (i >= n) break;
      float m = static_cast<float>(p.m[i]);
      if (c.cfg) m += c.w * (static_cast<float>(p.mc[i]) - m);
      const float zi = p.noise ? static_cast<float>(p.noise[i]) : z[k];
      float y = ddpm_step_unknown(c, m, static_cast<float>(p.x[i]), zi);
      if (c.masked) y += static_cast<float>(p.mask[i]) * (c.k_x0 * static_cast<float>(p.known[i]) + c.k_z * zi - y);
      p.out[i] = static_cast<T>(y);
    }
  }
}

template <typename T>
__global__ void add_noise_kernel(const T* __restrict__ x0, const T* __restrict__ z, const float* __restrict__ sa,
                                 const float* __restrict__ s1, T* __restrict__ out, int64_t n, int64_t per_sample) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    out[i] = static_cast<T>(sa[b] * static_cast<float>(x0[i]) + s1[b] * static_cast<float>(z[i]));
  }
}

int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20));
}

at::Tensor ddpm_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                          const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& known, c10::string_view prediction_type,
                          double sqrt_alpha_prod, double sqrt_one_minus_alpha_prod, std::optional<double> clip_range,
                          bool recompute_eps, double coef_x0, double coef_eps, double coef_sample, double sigma,
                          double known_coef, double known_noise_coef, std::optional<double> guidance_scale,
                          std::optional<int64_t> seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(sample.device());
  auto call = prepare_ddpm_step(model_output, sample, noise, mask, known, std::string(prediction_type),
                                sqrt_alpha_prod, sqrt_one_minus_alpha_prod, clip_range, recompute_eps, coef_x0,
                                coef_eps, coef_sample, sigma, known_coef, known_noise_coef, guidance_scale, seed,
                                offset);
  const int64_t n = call.sample.numel();
  if (n == 0) return call.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(call.sample.scalar_type(), "ddpm_step_cuda", [&] {
    Ptrs<scalar_t> p;
    p.m = call.model_output.const_data_ptr<scalar_t>();
    p.mc = call.coefs.cfg ? p.m + n : nullptr;
    p.x = call.sample.const_data_ptr<scalar_t>();
    p.noise = call.coefs.noise && call.noise.defined() ? call.noise.const_data_ptr<scalar_t>() : nullptr;
    p.mask = call.coefs.masked ? call.mask.const_data_ptr<scalar_t>() : nullptr;
    p.known = call.coefs.masked ? call.known.const_data_ptr<scalar_t>() : nullptr;
    p.out = call.out.mutable_data_ptr<scalar_t>();
    ddpm_step_kernel<scalar_t><<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(call.coefs, p, n, call.philox,
                                                                               call.seed, call.offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.out;
}

at::Tensor add_noise_cuda(const at::Tensor& original, const at::Tensor& noise, const at::Tensor& sqrt_alpha_prod,
                          const at::Tensor& sqrt_one_minus_alpha_prod) {
  const c10::cuda::CUDAGuard guard(original.device());
  auto call = prepare_add_noise(original, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod);
  const auto &x0 = call.original, &z = call.noise, &sa = call.sa, &s1 = call.s1;
  auto& out = call.out;
  const int64_t n = x0.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  GENKERN_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "add_noise_cuda", [&] {
    add_noise_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        x0.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), sa.const_data_ptr<float>(),
        s1.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), n, n / x0.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("add_noise", &add_noise_cuda);
}

}  // namespace genkern::cuda
