// group_norm_silu: argument checks and the shape/layout description shared by the CPU and CUDA
// kernels. The maths (see genkern/reference/group_norm_silu.py, the readable version):
//   forward:  mu, rstd over each (n, group);  u = (x - mu) * rstd * w_c + b_c;  y = act(u)
//   backward: du = dy * act'(u) with u recomputed from x, mu, rstd (nothing else is saved);
//             per (n, c): dsc = sum_hw du * (x - mu),  db = sum_hw du
//             dw_c = sum_n rstd * dsc,  db_c = sum_n db
//             per (n, g): A = mean_g(w_c * du) = sum_c w_c db / M,  B = sum_c w_c rstd dsc / M
//             dx = rstd * w_c * du - rstd * A - rstd^2 * B * (x - mu)
// Statistics use sums of (x - pivot), pivot = the group's first element, so that the variance
// E[(x-p)^2] - E[x-p]^2 does not cancel catastrophically for inputs with a large mean.
#pragma once
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "activation.h"
#include "checks.h"
#include "layout.h"

namespace genkern {

struct GroupNormShape {
  int64_t N, C, HW, G, D;  // D = channels per group; HW = product of the spatial sizes
  bool channels_last;      // memory is [N, HW, C] rather than [N, C, HW]
};

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "group_norm_silu: ", name,
                   " must be float32, float16 or bfloat16, got ", s);
}

inline void check_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value()) return;
  check_float_dtype(*p, name);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), "group_norm_silu: ", name,
                    " must have shape [C] = [", x.size(1), "], got ", p->sizes());
  check_same_device("group_norm_silu", name, *p, "x", x);
}

inline GroupNormShape group_norm_shape(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "group_norm_silu: x must have shape (N, C, *), got ", x.sizes());
  check_float_dtype(x, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "group_norm_silu: num_groups (", num_groups,
                    ") must be positive and divide the number of channels C=", C);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  GroupNormShape s;
  s.N = x.size(0);
  s.C = C;
  s.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.HW *= x.size(d);
  s.G = num_groups;
  s.D = C / num_groups;
  s.channels_last = is_channels_last_dense(x);
  return s;
}

inline void check_saved_stats(const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x,
                              const GroupNormShape& s) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->numel() == s.N * s.G,
                      "group_norm_silu_backward: mean and rstd must be float32 with N*num_groups=",
                      s.N * s.G, " elements, got ", t->scalar_type(), " with ", t->numel());
    check_same_device("group_norm_silu_backward", name, *t, "x", x);
  }
}

// Weight/bias as float32 [C] (ones/zeros when absent): the kernels always read float32 parameters.
inline at::Tensor param_or(const std::optional<at::Tensor>& p, const at::Tensor& x, float fill) {
  if (!p.has_value()) return at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
  // the usual case asks nothing of the dispatcher (two no-op conversions were ~1 us each per call)
  if (p->scalar_type() == at::kFloat && p->is_contiguous()) return *p;
  return p->to(at::kFloat).contiguous();
}

inline at::ScalarType param_grad_dtype(const std::optional<at::Tensor>& p, const at::Tensor& x) {
  return p.has_value() ? p->scalar_type() : x.scalar_type();
}

// The checked, kernel-laid-out arguments and the outputs of a forward call (CPU and CUDA alike).
struct ForwardCall {
  Activation act;
  at::Tensor x, y, mean, rstd;
  GroupNormShape s;
};

inline ForwardCall prepare_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                                   c10::string_view activation) {
  ForwardCall c;
  c.act = parse_activation(std::string(activation));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "group_norm_silu: eps must be finite and >= 0, got ", eps);
  c.x = to_kernel_layout(x_in);
  c.s = group_norm_shape(c.x, weight, bias, num_groups);
  c.y = at::empty_like(c.x);
  c.mean = at::empty({c.s.N, c.s.G}, c.x.options().dtype(at::kFloat));
  c.rstd = at::empty({c.s.N, c.s.G}, c.x.options().dtype(at::kFloat));
  if (c.x.numel() == 0) {  // statistics of an empty group are undefined
    c.mean.fill_(NAN);
    c.rstd.fill_(NAN);
  }
  return c;
}

// The same for a backward call: dy in x's memory layout, so both are walked with the same offsets.
struct BackwardCall {
  Activation act;
  at::Tensor x, dy, mean, rstd, dx;
  GroupNormShape s;
  at::ScalarType weight_grad_dtype, bias_grad_dtype;
};

inline BackwardCall prepare_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                                     c10::string_view activation) {
  BackwardCall c;
  c.act = parse_activation(std::string(activation));
  c.x = to_kernel_layout(x_in);
  c.s = group_norm_shape(c.x, weight, bias, num_groups);
  TORCH_CHECK_VALUE(grad_y.sizes() == c.x.sizes() && grad_y.scalar_type() == c.x.scalar_type(),
                    "group_norm_silu_backward: grad_y must match x in shape and dtype, got ", grad_y.sizes(),
                    " ", grad_y.scalar_type(), " vs ", c.x.sizes(), " ", c.x.scalar_type());
  check_same_device("group_norm_silu_backward", "grad_y", grad_y, "x", c.x);
  check_saved_stats(mean, rstd, c.x, c.s);
  c.dy = grad_y.strides() == c.x.strides() ? grad_y : at::empty_like(c.x).copy_(grad_y);
  c.mean = mean.contiguous();
  c.rstd = rstd.contiguous();
  c.dx = at::empty_like(c.x);
  c.weight_grad_dtype = param_grad_dtype(weight, c.x);
  c.bias_grad_dtype = param_grad_dtype(bias, c.x);
  return c;
}

}  // namespace genkern
