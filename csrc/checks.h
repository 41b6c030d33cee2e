// Argument checks shared by every op's host code.
#pragma once
#include <ATen/ATen.h>

namespace genkern {

// "op: name is on D but ref_name is on E" unless t is on ref's device. The kernels read every operand
// through a pointer of the call's device: one on another device would be a bad address, not an error.
// Mirrored in genkern/ops/_checks.py::check_same_device.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

}  // namespace genkern
