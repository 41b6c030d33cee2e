// Candidate: GroupNorm+SiLU's one-pass (cluster) kernels of csrc/cuda/group_norm_silu_cluster.cuh, the
// very kernels genkern._C ships, with their two tuning knobs set otherwise: the minimum of resident CTAs
// per SM in their __launch_bounds__ (min_blocks 1, 2 or 3; the shipped ones take kClusterMinBlocks = 3)
// and the bytes of x a CTA keeps in shared memory (slice_bytes; 0 = the shipped kSliceBytes forward and
// kGradSliceBytes per tensor backward). The arithmetic is the same, so run.py's timing says which setting
// the H100 prefers (README.md).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/group_norm_silu_cluster.cuh"
#include "group_norm_silu.h"

namespace genkern::cuda {
namespace {

SliceGeometry checked_geometry(const SliceGeometry& g) {
  TORCH_CHECK_VALUE(g.k > 0, "group_norm_silu_tuning: the one-pass path does not take this shape or GPU");
  return g;
}

int64_t checked_slice_bytes(int64_t slice_bytes, int64_t shipped) {
  TORCH_CHECK_VALUE(slice_bytes == 0 || (slice_bytes >= 4096 && slice_bytes <= shipped),
                    "group_norm_silu_tuning: slice_bytes must be 0 (shipped) or 4096..", shipped, ", got ", slice_bytes);
  return slice_bytes == 0 ? shipped : slice_bytes;
}

// fn(integral_constant<int, min_blocks>)
template <typename Fn>
auto with_min_blocks(int64_t min_blocks, Fn&& fn) {
  TORCH_CHECK_VALUE(min_blocks >= 1 && min_blocks <= 3, "group_norm_silu_tuning: min_blocks must be 1, 2 or 3");
  if (min_blocks == 1) return fn(std::integral_constant<int, 1>{});
  if (min_blocks == 2) return fn(std::integral_constant<int, 2>{});
  return fn(std::integral_constant<int, 3>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_tuning(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, c10::string_view activation, int64_t min_blocks, int64_t slice_bytes) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  ForwardCall c = prepare_forward(x_in, weight, bias, num_groups, eps, activation);
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(c.s, c.x);
  const SliceGeometry g =
      checked_geometry(make_slice_geometry(c.s, c.x, vec, checked_slice_bytes(slice_bytes, kSliceBytes)));
  with_min_blocks(min_blocks, [&](auto mb) { cluster_forward<decltype(mb)::value>(c, w, b, g, vec, eps); });
  return {c.y, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_tuning_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation, int64_t min_blocks, int64_t slice_bytes) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardCall c = prepare_backward(grad_y, x_in, weight, bias, mean, rstd, num_groups, activation);
  const at::Tensor w = param_or(weight, c.x, 1.f), b = param_or(bias, c.x, 0.f);
  const int vec = slice_vec(c.s, c.x, c.dy);
  const SliceGeometry g =
      checked_geometry(make_grad_slice_geometry(c.s, c.x, vec, checked_slice_bytes(slice_bytes, kGradSliceBytes)));
  auto [dw, db] = with_min_blocks(min_blocks, [&](auto mb) { return cluster_backward<decltype(mb)::value>(c, w, b, g, vec); });
  return {c.dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genkern_candidates, m) {
  m.def("group_norm_silu_tuning(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
        "str activation, int min_blocks, int slice_bytes) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_tuning_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, int num_groups, str activation, int min_blocks, int slice_bytes) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(genkern_candidates, CUDA, m) {
  m.impl("group_norm_silu_tuning", &group_norm_silu_tuning);
  m.impl("group_norm_silu_tuning_backward", &group_norm_silu_tuning_backward);
}

}  // namespace genkern::cuda
