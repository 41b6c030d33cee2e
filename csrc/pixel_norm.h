// pixel_norm: checks and shapes shared by the CPU and CUDA kernels. The maths (readable version:
// genkern/reference/pixel_norm.py), per feature vector x of C channels (a pixel, or a row of [N, C]):
//   forward:  r = 1 / sqrt(mean_c(x^2) + eps),  y = x r          (r saved, float32 [N, P])
//   backward: dx = r (dy - x r^2 mean_c(dy x))
// x is read as [N, C, P] (NCHW-contiguous) or [N, P, C] (channels-last-dense), P = prod(spatial).
#pragma once
#include <cmath>

#include <ATen/ATen.h>

#include "checks.h"
#include "layout.h"

namespace genkern {

struct PixelNormShape {
  int64_t N, C, P;
  bool channels_last;
};

inline PixelNormShape pixel_norm_shape(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", st);
  PixelNormShape s{x.size(0), x.size(1), 1, is_channels_last_dense(x)};
  for (int64_t d = 2; d < x.dim(); ++d) s.P *= x.size(d);
  TORCH_CHECK_VALUE(s.C > 0 || x.numel() == 0, op, ": x must have at least one channel");
  return s;
}

inline void check_pixel_norm_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "pixel_norm: eps must be finite and >= 0, got ", eps);
}

inline void check_pixel_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd,
                                      const PixelNormShape& s) {
  check_same_device("pixel_norm_backward", "grad_y", grad_y, "x", x);
  check_same_device("pixel_norm_backward", "rstd", rstd, "x", x);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
                    "pixel_norm_backward: grad_y must match x in shape and dtype, got ", grad_y.sizes(), " ",
                    grad_y.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.numel() == s.N * s.P,
                    "pixel_norm_backward: rstd must be float32 with N*prod(spatial)=", s.N * s.P,
                    " elements, got ", rstd.scalar_type(), " with ", rstd.numel());
}

// The forward's input in the kernel layout and its outputs (y like x, rstd float32 [N, P]).
struct PixelNormForwardCall {
  at::Tensor x, y, rstd;
  PixelNormShape s;
};

inline PixelNormForwardCall prepare_pixel_norm_forward(const at::Tensor& x_in, double eps) {
  check_pixel_norm_eps(eps);
  PixelNormForwardCall c;
  c.x = to_kernel_layout(x_in);
  c.s = pixel_norm_shape(c.x, "pixel_norm");
  c.y = at::empty_like(c.x);
  c.rstd = at::empty({c.s.N, c.s.P}, c.x.options().dtype(at::kFloat));
  return c;
}

// The backward's operands in the kernel layout (dy brought to x's strides) and its output.
struct PixelNormBackwardCall {
  at::Tensor x, dy, rstd, dx;
  PixelNormShape s;
};

inline PixelNormBackwardCall prepare_pixel_norm_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                         const at::Tensor& rstd) {
  PixelNormBackwardCall c;
  c.x = to_kernel_layout(x_in);
  c.s = pixel_norm_shape(c.x, "pixel_norm_backward");
  check_pixel_norm_backward(grad_y, c.x, rstd, c.s);
  c.dy = grad_y.strides() == c.x.strides() ? grad_y : at::empty_like(c.x).copy_(grad_y);
  c.rstd = rstd.contiguous();
  c.dx = at::empty_like(c.x);
  return c;
}

}  // namespace genkern
