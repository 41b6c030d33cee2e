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
  // One reverse-diffusion update x_t -> x_{t-1} (DDPM or DDIM; csrc/ddpm_step.h has the maths). The
  // per-step scalars come from the host (genkern/ops/ddpm_step.py: step_coefficients). guidance_scale
  // set: model_output is [2B, ...] = (unconditional, conditional). Noise: the tensor `noise`, or the
  // Philox stream (seed, offset) generated in the kernel, or none. mask/known: inpainting.
  m.def("ddpm_step(Tensor model_output, Tensor sample, Tensor? noise, Tensor? mask, Tensor? known, "
        "str prediction_type, float sqrt_alpha_prod, float sqrt_one_minus_alpha_prod, float? clip_range, "
        "bool recompute_eps, float coef_x0, float coef_eps, float coef_sample, float sigma, "
        "float known_coef, float known_noise_coef, float? guidance_scale, int? seed, int offset) -> Tensor");
  // The forward process q(x_t | x_0): sqrt_alpha_prod[b] * original + sqrt_one_minus_alpha_prod[b] * noise
  // with float32 per-sample coefficients of shape [N].
  m.def("add_noise(Tensor original_samples, Tensor noise, Tensor sqrt_alpha_prod, "
        "Tensor sqrt_one_minus_alpha_prod) -> Tensor");
  // Pixel norm: y = x / sqrt(mean_c(x^2) + eps); returns (y, rstd), rstd float32 [N, prod(spatial)].
  m.def("pixel_norm(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("pixel_norm_backward(Tensor grad_y, Tensor x, Tensor rstd) -> Tensor");
  // Minibatch standard deviation (StyleGAN2): x [N, C, H, W] -> [N, C + num_channels, H, W].
  m.def("minibatch_stddev(Tensor x, int group_size, int num_channels, float eps) -> Tensor");
  m.def("minibatch_stddev_backward(Tensor grad_out, Tensor x, int group_size, int num_channels, float eps) -> Tensor");
  // Gradient-norm penalty of a per-sample gradient g [N, ...]: weight * mean_i (||g_i|| - target)^2, or
  // weight * mean_i ||g_i||^2 when target is None. Returns (loss (0-d float32), norms float32 [N]).
  m.def("gradient_penalty(Tensor grad, float weight, float? target) -> (Tensor, Tensor)");
  m.def("gradient_penalty_backward(Tensor grad_loss, Tensor grad, Tensor norms, float weight, float? target) -> Tensor");
  // Both at once, for a forward whose backward will follow: (loss, norms, d loss / d grad), the last as
  // gradient_penalty_backward gives it for grad_loss = 1. CPU only (genkern/ops/gradient_penalty.py: why).
  m.def("gradient_penalty_and_grad(Tensor grad, float weight, float? target) -> (Tensor, Tensor, Tensor)");
}
