// ddpm_step / add_noise: argument checks, the per-step coefficients and the per-element maths shared by
// the CPU and CUDA kernels. The readable definition is genkern/reference/ddpm_step.py; in short, with
// m the model output (m = m_u + w (m_c - m_u) under classifier-free guidance), x = x_t, z the noise:
//   (x0, eps) from m by prediction type:   epsilon: x0 = (x - s1 m) / sa,   eps = m
//                                          sample:  x0 = m,                  eps = (x - sa x0) / s1
//                                          v:       x0 = sa x - s1 m,        eps = sa m + s1 x
//   (sa = sqrt(alpha_bar_t), s1 = sqrt(1 - alpha_bar_t)); optionally x0 = clamp(x0, -r, r) and then
//   eps = (x - sa x0) / s1 again (diffusers' use_clipped_model_output);
//   x_prev = c_x0 x0 + c_eps eps + c_xt x + sigma z   (DDPM: c_eps = 0; DDIM: c_xt = 0)
//   inpainting: x_prev = x_prev + mask ((k_x0 known + k_z z) - x_prev)
// Everything is linear in (x, m) before the clamp, so x0 and eps are two multiply-adds each.
#pragma once
#include <cmath>
#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "checks.h"
#include "layout.h"
#include "philox.h"

namespace genkern {

struct DdpmStepCoefs {
  float x0_x, x0_m, eps_x, eps_m;  // x0 = x0_x x + x0_m m;  eps = eps_x x + eps_m m
  bool clip, recompute_eps;
  float clip_range, sa, inv_s1;    // for the clamp and the eps recomputed from the clamped x0
  float c_x0, c_eps, c_xt, sigma;  // x_prev = c_x0 x0 + c_eps eps + c_xt x + sigma z
  float k_x0, k_z;                 // known region: k_x0 known + k_z z
  bool cfg, noise, masked;         // guided model output, z != 0 somewhere, inpainting
  float w;                         // guidance scale
};

// clamp(v, -r, r) for the element type V of ddpm_step_unknown; the CPU kernels add at::vec's.
template <typename V>
struct ClampRange;
template <>
struct ClampRange<float> {
  GENKERN_HD static float apply(float v, float r) { return fminf(fmaxf(v, -r), r); }
};

// x_prev before inpainting, for one element (V = float) or a vector of them (CPU: at::vec).
template <typename V>
GENKERN_HD V ddpm_step_unknown(const DdpmStepCoefs& c, V m, V x, V z) {
  V x0 = V(c.x0_x) * x + V(c.x0_m) * m;
  V eps = V(c.eps_x) * x + V(c.eps_m) * m;
  if (c.clip) {
    x0 = ClampRange<V>::apply(x0, c.clip_range);
    if (c.recompute_eps) eps = (x - V(c.sa) * x0) * V(c.inv_s1);
  }
  return V(c.c_x0) * x0 + V(c.c_eps) * eps + V(c.c_xt) * x + V(c.sigma) * z;
}

struct DdpmStepCall {
  at::Tensor model_output, sample, noise, mask, known, out;  // noise/mask/known undefined when absent
  DdpmStepCoefs coefs;
  bool philox;
  uint64_t seed, offset;
};

inline void check_same(const at::Tensor& t, const at::Tensor& sample, const char* name, bool same_shape = true) {
  check_same_device("ddpm_step", name, t, "sample", sample);
  TORCH_CHECK_TYPE(t.scalar_type() == sample.scalar_type(), "ddpm_step: ", name, " must have sample's dtype ",
                   sample.scalar_type(), ", got ", t.scalar_type());
  if (same_shape)
    TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), "ddpm_step: ", name, " must have sample's shape ",
                      sample.sizes(), ", got ", t.sizes());
}

inline DdpmStepCall prepare_ddpm_step(
    const at::Tensor& model_output, const at::Tensor& sample, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& known,
    const std::string& prediction_type, double sqrt_alpha_prod, double sqrt_one_minus_alpha_prod,
    std::optional<double> clip_range, bool recompute_eps, double coef_x0, double coef_eps, double coef_sample,
    double sigma, double known_coef, double known_noise_coef, std::optional<double> guidance_scale,
    std::optional<int64_t> seed, int64_t offset) {
  const auto st = sample.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "ddpm_step: sample must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(sample.dim() >= 1, "ddpm_step: sample must have a batch dimension, got a 0-d tensor");
  const bool cfg = guidance_scale.has_value();
  check_same(model_output, sample, "model_output", !cfg);
  if (cfg) {
    auto want = sample.sizes().vec();
    want[0] *= 2;
    TORCH_CHECK_VALUE(model_output.sizes() == at::IntArrayRef(want), "ddpm_step: with guidance_scale, ",
                      "model_output must hold the unconditional and conditional halves, shape ", want,
                      " for sample of shape ", sample.sizes(), ", got ", model_output.sizes());
    TORCH_CHECK_VALUE(std::isfinite(*guidance_scale), "ddpm_step: guidance_scale must be finite, got ",
                      *guidance_scale);
  }
  TORCH_CHECK_VALUE(prediction_type == "epsilon" || prediction_type == "sample" || prediction_type == "v_prediction",
                    "ddpm_step: prediction_type must be 'epsilon', 'sample' or 'v_prediction', got '",
                    prediction_type, "'");
  TORCH_CHECK_VALUE(sqrt_alpha_prod > 0 && sqrt_one_minus_alpha_prod > 0 && std::isfinite(sqrt_alpha_prod) &&
                        std::isfinite(sqrt_one_minus_alpha_prod),
                    "ddpm_step: sqrt_alpha_prod and sqrt_one_minus_alpha_prod must be finite and > 0, got ",
                    sqrt_alpha_prod, " and ", sqrt_one_minus_alpha_prod);
  for (double v : {coef_x0, coef_eps, coef_sample, sigma, known_coef, known_noise_coef})
    TORCH_CHECK_VALUE(std::isfinite(v), "ddpm_step: the step coefficients must be finite, got ", v);
  TORCH_CHECK_VALUE(!clip_range.has_value() || *clip_range > 0, "ddpm_step: clip_range must be > 0 or None, got ",
                    clip_range.value_or(0));
  TORCH_CHECK_VALUE(!(noise.has_value() && seed.has_value()), "ddpm_step: pass noise or seed, not both");
  TORCH_CHECK_VALUE(mask.has_value() == known.has_value(), "ddpm_step: mask and known must be given together");
  if (noise) check_same(*noise, sample, "noise");
  if (mask) check_same(*mask, sample, "mask");
  if (known) check_same(*known, sample, "known");

  DdpmStepCall call;
  const auto strides = elementwise_strides(sample);
  call.sample = to_strides(sample, strides);
  call.model_output = to_strides(model_output, strides);
  if (noise) call.noise = to_strides(*noise, strides);
  if (mask) call.mask = to_strides(*mask, strides);
  if (known) call.known = to_strides(*known, strides);
  call.out = at::empty_strided(sample.sizes(), strides, sample.options());

  const float sa = static_cast<float>(sqrt_alpha_prod), s1 = static_cast<float>(sqrt_one_minus_alpha_prod);
  auto& c = call.coefs;
  if (prediction_type == "epsilon") {
    c.x0_x = 1.0f / sa, c.x0_m = -s1 / sa, c.eps_x = 0.0f, c.eps_m = 1.0f;
  } else if (prediction_type == "sample") {
    c.x0_x = 0.0f, c.x0_m = 1.0f, c.eps_x = 1.0f / s1, c.eps_m = -sa / s1;
  } else {
    c.x0_x = sa, c.x0_m = -s1, c.eps_x = s1, c.eps_m = sa;
  }
  c.clip = clip_range.has_value();
  c.clip_range = static_cast<float>(clip_range.value_or(0.0));
  c.recompute_eps = recompute_eps;
  c.sa = sa;
  c.inv_s1 = 1.0f / s1;
  c.c_x0 = static_cast<float>(coef_x0);
  c.c_eps = static_cast<float>(coef_eps);
  c.c_xt = static_cast<float>(coef_sample);
  c.sigma = static_cast<float>(sigma);
  c.masked = mask.has_value();
  c.k_x0 = static_cast<float>(known_coef);
  c.k_z = c.masked ? static_cast<float>(known_noise_coef) : 0.0f;
  c.cfg = cfg;
  c.w = static_cast<float>(guidance_scale.value_or(0.0));
  c.noise = (noise.has_value() || seed.has_value()) && (c.sigma != 0.0f || c.k_z != 0.0f);
  call.philox = c.noise && seed.has_value();
  call.seed = static_cast<uint64_t>(seed.value_or(0));
  call.offset = static_cast<uint64_t>(offset);
  return call;
}

struct AddNoiseCall {
  at::Tensor original, noise, sa, s1, out;  // operands in the kernel layout, float32 coefficients
};

inline AddNoiseCall prepare_add_noise(const at::Tensor& original, const at::Tensor& noise, const at::Tensor& sa,
                                      const at::Tensor& s1) {
  const auto st = original.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "add_noise: original_samples must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(original.dim() >= 1, "add_noise: original_samples must have a batch dimension");
  check_same_device("add_noise", "noise", noise, "original_samples", original);
  TORCH_CHECK_VALUE(noise.sizes() == original.sizes() && noise.scalar_type() == st,
                    "add_noise: noise must match original_samples in shape and dtype, got ",
                    noise.sizes(), " ", noise.scalar_type(), " vs ", original.sizes(), " ", st);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"sqrt_alpha_prod", &sa}, {"sqrt_one_minus_alpha_prod", &s1}}) {
    check_same_device("add_noise", name, *t, "original_samples", original);
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == original.size(0),
                      "add_noise: sqrt_alpha_prod and sqrt_one_minus_alpha_prod must be float32 of shape [",
                      original.size(0), "], got ", t->scalar_type(), " ", t->sizes());
  }
  const auto strides = elementwise_strides(original);
  return {to_strides(original, strides), to_strides(noise, strides), sa.contiguous(), s1.contiguous(),
          at::empty_strided(original.sizes(), strides, original.options())};
}

}  // namespace genkern
