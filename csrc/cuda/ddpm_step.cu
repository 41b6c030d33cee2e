// ddpm_step and add_noise on CUDA. Maths and checks in csrc/ddpm_step.h, the noise in csrc/philox.h.
// One thread owns one Philox group: 4 consecutive elements of memory, so one Philox call gives
// exactly the 4 normals it needs and the noise never touches memory, and (when the size and the
// pointers allow) every tensor is read and written with one vector access per group. 64-bit indices.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm_step.h"
#include "cuda/vec_pack.cuh"
#include "dispatch.h"

namespace genkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Ptrs {
  const T *m, *mc, *x, *noise, *mask, *known;
  T* out;
};

// Elements [4g, 4g + 4) of t as floats; kVec: one 16-byte (fp32) or 8-byte (fp16/bf16) access (needs
// n % 4 == 0 and aligned pointers), else scalar accesses up to n.
template <bool kVec, typename T>
__device__ __forceinline__ void load4(const T* t, int64_t g, int64_t n, float (&o)[4]) {
  if (kVec) {
    const VecPack<T, 4> q = reinterpret_cast<const VecPack<T, 4>*>(t)[g];
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = static_cast<float>(q.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = 4 * g + k < n ? static_cast<float>(t[4 * g + k]) : 0.f;
  }
}

template <bool kVec, typename T>
__device__ __forceinline__ void store4(T* t, int64_t g, int64_t n, const float (&o)[4]) {
  if (kVec) {
    VecPack<T, 4> q;
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = static_cast<T>(o[k]);
    reinterpret_cast<VecPack<T, 4>*>(t)[g] = q;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * g + k < n) t[4 * g + k] = static_cast<T>(o[k]);
  }
}

template <typename T, bool kVec>
__global__ void ddpm_step_kernel(DdpmStepCoefs c, Ptrs<T> p, int64_t n, bool philox, uint64_t seed,
                                 uint64_t offset) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f}, m[4], mc[4], x[4], y[4];
    // loads first, so that the Philox arithmetic overlaps their latency
    load4<kVec>(p.m, g, n, m);
    load4<kVec>(p.x, g, n, x);
    if (c.cfg) load4<kVec>(p.mc, g, n, mc);
    if (p.noise) {
      load4<kVec>(p.noise, g, n, z);
    } else if (philox) {
      philox_normal4(seed, offset, static_cast<uint64_t>(g), z);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (c.cfg) m[k] += c.w * (mc[k] - m[k]);
      y[k] = ddpm_step_unknown(c, m[k], x[k], z[k]);
    }
    if (c.masked) {
      float mask[4], known[4];
      load4<kVec>(p.mask, g, n, mask);
      load4<kVec>(p.known, g, n, known);
#pragma unroll
      for (int k = 0; k < 4; ++k) y[k] += mask[k] * (c.k_x0 * known[k] + c.k_z * z[k] - y[k]);
    }
    store4<kVec>(p.out, g, n, y);
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
    bool vec = n % 4 == 0;
    for (const void* q : {static_cast<const void*>(p.m), static_cast<const void*>(p.mc), static_cast<const void*>(p.x),
                          static_cast<const void*>(p.noise), static_cast<const void*>(p.mask),
                          static_cast<const void*>(p.known), static_cast<const void*>(p.out)}) {
      vec = vec && reinterpret_cast<uintptr_t>(q) % (4 * sizeof(scalar_t)) == 0;
    }
    const int grid = grid_for((n + 3) / 4);
    if (vec) {
      ddpm_step_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(call.coefs, p, n, call.philox, call.seed,
                                                                      call.offset);
    } else {
      ddpm_step_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(call.coefs, p, n, call.philox, call.seed,
                                                                       call.offset);
    }
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
