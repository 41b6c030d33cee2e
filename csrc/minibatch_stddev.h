// minibatch_stddev: checks and shapes shared by the CPU and CUDA kernels. The maths (readable version:
// genkern/reference/minibatch_stddev.py): with G = min(group_size, N), M = N / G columns, F = num_channels
// and c = C / F, sample i = g M + m sits in column m; at every (m, channel, pixel)
//   mu = mean_g x[g M + m],  s = sqrt(mean_g (x - mu)^2 + eps)
//   stat[m, f] = mean of s over the c channels of slice f and all pixels
//   out = [x, stat[i % M, f] broadcast over pixels]                       [N, C + F, H, W]
// backward: k[m, f] = sum of dout's stat channels over the column's G samples and the pixels / (G c H W);
//   dx = dout[:, :C] + k[m, f] (x - mu) / s        (the mean's own term cancels: sum_g (x - mu) = 0)
// The copy of x into out happens in the same pass that reads x for the statistics.
#pragma once
#include <cmath>

#include <ATen/ATen.h>

#include "checks.h"
#include "layout.h"

namespace genkern {

struct MbstdShape {
  int64_t N, C, P, G, M, F, c;  // P = H W
  bool channels_last;
};

inline MbstdShape mbstd_shape(const at::Tensor& x, int64_t group_size, int64_t num_channels, double eps,
                              const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must have shape (N, C, H, W), got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(num_channels >= 1, op, ": num_channels must be >= 1, got ", num_channels);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  MbstdShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.P = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(s.N >= 1 && s.C >= 1 && s.P >= 1, op, ": x must not be empty, got shape ", x.sizes());
  s.G = std::min(group_size, s.N);
  TORCH_CHECK_VALUE(s.N % s.G == 0, op, ": the batch size N=", s.N, " must be divisible by the group size G=min(",
                    group_size, ", N)=", s.G);
  s.F = num_channels;
  TORCH_CHECK_VALUE(s.C % s.F == 0, op, ": the channels C=", s.C, " must be divisible by num_channels=", s.F);
  s.M = s.N / s.G;
  s.c = s.C / s.F;
  s.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return s;
}

inline at::MemoryFormat mbstd_format(const MbstdShape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// stat [M, F] float32 written into out's last F channels, sample i taking column i % M.
inline void mbstd_fill_stats(at::Tensor& out, const at::Tensor& stat, const MbstdShape& s) {
  const auto per_sample = stat.repeat({s.G, 1}).to(out.scalar_type());  // [N, F]
  out.narrow(1, s.C, s.F).copy_(per_sample.view({s.N, s.F, 1, 1}).expand({s.N, s.F, out.size(2), out.size(3)}));
}

// k[m, f] of the backward, float32 [M, F], from dout's last F channels.
inline at::Tensor mbstd_grad_coef(const at::Tensor& grad_out, const MbstdShape& s) {
  const auto g = grad_out.narrow(1, s.C, s.F).sum({2, 3}, false, at::kFloat);  // [N, F]
  return g.view({s.G, s.M, s.F}).sum(0).div_(static_cast<double>(s.G * s.c * s.P)).contiguous();
}

inline void check_mbstd_grad(const at::Tensor& grad_out, const at::Tensor& x, const MbstdShape& s) {
  check_same_device("minibatch_stddev_backward", "grad_out", grad_out, "x", x);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C + s.F &&
                        grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3) &&
                        grad_out.scalar_type() == x.scalar_type(),
                    "minibatch_stddev_backward: grad_out must be [N, C + num_channels, H, W] = [", s.N, ", ",
                    s.C + s.F, ", ", x.size(2), ", ", x.size(3), "] of x's dtype, got ", grad_out.sizes(),
                    " ", grad_out.scalar_type());
}

}  // namespace genkern
