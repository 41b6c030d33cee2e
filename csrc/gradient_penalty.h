// gradient_penalty: checks and the per-sample coefficients shared by the CPU and CUDA kernels.
// Readable version: genkern/reference/gradient_penalty.py. For a gradient g [N, ...]:
//   n_i = ||g_i||_2 (float32, saved);  loss = weight mean_i (n_i - target)^2   (WGAN-GP)
//                                        or weight mean_i n_i^2               (R1: target None)
//   backward: dg_i = dloss * (2 weight / N) * a_i * g_i,  a_i = 1 - target / n_i (0 where n_i = 0) or 1.
// Each sample is one contiguous block of memory in the kernel layout (layout.h: elementwise_strides),
// so the norm does not depend on the layout.
#pragma once
#include <cmath>

#include <ATen/ATen.h>

#include "host_device.h"
#include "checks.h"
#include "layout.h"

namespace genkern {

inline void check_gradient_penalty(const at::Tensor& grad, double weight, std::optional<double> target,
                                   const char* op) {
  const auto st = grad.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": grad must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad.size(0) >= 1, op, ": grad must be [N, ...] with N >= 1, got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(std::isfinite(weight), op, ": weight must be finite, got ", weight);
  TORCH_CHECK_VALUE(!target.has_value() || std::isfinite(*target), op, ": target must be finite or None");
}

inline void check_gradient_penalty_backward(const at::Tensor& grad_loss, const at::Tensor& grad,
                                           const at::Tensor& norms, double weight, std::optional<double> target) {
  check_gradient_penalty(grad, weight, target, "gradient_penalty_backward");
  TORCH_CHECK_VALUE(norms.scalar_type() == at::kFloat && norms.dim() == 1 && norms.size(0) == grad.size(0),
                    "gradient_penalty_backward: norms must be float32 [N] = [", grad.size(0), "], got ",
                    norms.scalar_type(), " ", norms.sizes());
  check_same_device("gradient_penalty_backward", "norms", norms, "grad", grad);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "gradient_penalty_backward: grad_loss must hold one value");
}

// The target as the kernels take it (std::optional does not reach CUDA device code).
struct PenaltyTarget {
  bool has;
  double value;
};

inline PenaltyTarget penalty_target(std::optional<double> target) {
  return {target.has_value(), target.value_or(0.0)};
}

// Sample i's term of the loss from its sum of squares s: (n_i - target)^2, or n_i^2 = s (R1).
GENKERN_HD double penalty_term(double s, PenaltyTarget target) {
  if (!target.has) return s;
  const double d = sqrt(s) - target.value;
  return d * d;
}

// k a_i from the saved float32 norm n, k = dloss 2 weight / N: the factor sample i's gradient is
// multiplied by.
GENKERN_HD float sample_scale(double k, float n, PenaltyTarget target) {
  return static_cast<float>(k * (!target.has ? 1.0 : (n > 0 ? 1.0 - target.value / n : 0.0)));
}

}  // namespace genkern
