// Memory layouts the kernels walk, shared by every op.
#pragma once
#include <vector>

#include <ATen/ATen.h>

namespace genkern {

// True when x is dense with the channels innermost: (N, *spatial, C) order in memory.
inline bool is_channels_last_dense(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) return false;
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

// The layouts the kernels read: NCHW-contiguous or channels-last-dense; anything else is copied.
inline at::Tensor to_kernel_layout(const at::Tensor& x) {
  return (x.is_contiguous() || is_channels_last_dense(x)) ? x : x.contiguous();
}

// The layout elementwise kernels (ddpm_step, add_noise, gradient_penalty) walk: the tensor's own memory
// order when it is dense with the batch outermost (contiguous, channels_last, ...), else contiguous.
// Every operand is brought to it, so each sample is one contiguous block and the kernels run over memory.
// Mirrored in genkern/_layout.py::elementwise_strides.
inline std::vector<int64_t> elementwise_strides(const at::Tensor& sample) {
  const bool batch_outer = sample.dim() == 0 || sample.size(0) <= 1 ||
                           sample.stride(0) * sample.size(0) == sample.numel();
  if (sample.is_non_overlapping_and_dense() && batch_outer) return sample.strides().vec();
  return at::empty(sample.sizes(), sample.options()).strides().vec();
}

inline at::Tensor to_strides(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides) return t;
  auto out = at::empty_strided(t.sizes(), strides, t.options());
  out.copy_(t);
  return out;
}

}  // namespace genkern
