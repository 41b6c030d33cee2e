// Op schemas of genkern: every op the extension implements is declared here, once.
// CPU kernels register in csrc/cpu/<op>.cpp, CUDA kernels in csrc/cuda/<op>.cu; fake (meta) kernels
// and autograd formulas are registered from Python (genkern/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

// `import genkern._C` loads this library so that its TORCH_LIBRARY blocks run; the module is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(genkern, m) {
  // y = act(GroupNorm(x)); returns (y, mean, rstd), mean/rstd float32 of shape [N, num_groups].
  // activation: "silu", "gelu" or "none".
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
        "str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias); grad_weight/grad_bias have shape [C] even when
  // weight/bias are None (then they are ignored by autograd).
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor rstd, int num_groups, str activation) -> (Tensor, Tensor, Tensor)");
}
