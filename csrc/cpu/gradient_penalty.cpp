// gradient_penalty on CPU. Maths and checks in csrc/gradient_penalty.h.
// Forward: per-sample sums of squares, each sample split into chunks that threads take in any order,
// the chunks' float32 vector sums combined in double. Backward: dg = scale_i g, one pass. And both at
// once (gradient_penalty_and_grad), for a forward whose backward will follow.
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
#include "cpu/vec.h"
#include "dispatch.h"
#include "gradient_penalty.h"

namespace genkern::cpu {
namespace {

constexpr int64_t kChunk = 16384;

// sum of p[k]^2 over [b, e) (at most kChunk values): float32 vector sums, combined in double
template <typename T>
double sum_squares(const T* p, int64_t b, int64_t e) {
  using IO = VecIO<T>;
  // four accumulators: with two the loop waits on the FMA latency, not on the loads
  Vec s0(0.0f), s1(0.0f), s2(0.0f), s3(0.0f);
  int64_t k = b;
  for (; k + 2 * IO::kStep <= e; k += 2 * IO::kStep) {
    Vec a, c, a2, c2;
    IO::load(p + k, a, c);
    IO::load(p + k + IO::kStep, a2, c2);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(c, c, s1);
    s2 = at::vec::fmadd(a2, a2, s2);
    s3 = at::vec::fmadd(c2, c2, s3);
  }
  for (; k + IO::kStep <= e; k += IO::kStep) {
    Vec a, c;
    IO::load(p + k, a, c);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(c, c, s1);
  }
  double s = hsum((s0 + s2) + (s1 + s3));
  for (; k < e; ++k) s += static_cast<double>(p[k]) * static_cast<double>(p[k]);
  return s;
}

// weight mean_i term_i, the 0-d float32 loss
inline at::Tensor loss_tensor(double terms, double weight, int64_t N, const at::TensorOptions& options) {
  auto out = at::empty({}, options.dtype(at::kFloat));
  out.data_ptr<float>()[0] = static_cast<float>(weight * terms / N);
  return out;
}

// d[k] = f g[k] over [b, e)
template <typename T>
void scale_run(const T* g, T* d, int64_t b, int64_t e, float f) {
  using IO = VecIO<T>;
  const Vec v(f);
  int64_t k = b;
  for (; k + IO::kStep <= e; k += IO::kStep) {
    Vec a, c;
    IO::load(g + k, a, c);
    IO::store(d + k, a * v, c * v);
  }
  for (; k < e; ++k) d[k] = static_cast<T>(f * static_cast<float>(g[k]));
}

std::tuple<at::Tensor, at::Tensor> gradient_penalty(const at::Tensor& grad_in, double weight,
                                                    std::optional<double> target) {
  check_gradient_penalty(grad_in, weight, target, "gradient_penalty");
  const auto g = to_strides(grad_in, elementwise_strides(grad_in));
  const int64_t N = g.size(0), per = g.numel() / N, chunks = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
  std::vector<double> part(N * chunks, 0.0);
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_cpu", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    // small samples: several per task, so tiny gradients do not wake the other threads
    parallel_blocks(N * chunks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, std::min(per, kChunk))),
                    std::min(per, kChunk) * g.element_size(), [&](int64_t t) {
      const int64_t i = t / chunks, b = (t % chunks) * kChunk, e = std::min(per, b + kChunk);
      part[t] = sum_squares(pg + i * per, b, e);
    });
  });
  // N values: plain loops, not ATen ops (each of which costs more than this whole tail)
  auto norms = at::empty({N}, g.options().dtype(at::kFloat));
  double loss = 0.0;
  const PenaltyTarget tgt = penalty_target(target);
  for (int64_t i = 0; i < N; ++i) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += part[i * chunks + c];
    norms.data_ptr<float>()[i] = static_cast<float>(std::sqrt(s));
    loss += penalty_term(s, tgt);
  }
  return {loss_tensor(loss, weight, N, g.options()), norms};
}

at::Tensor gradient_penalty_backward(const at::Tensor& grad_loss, const at::Tensor& grad_in, const at::Tensor& norms,
                                     double weight, std::optional<double> target) {
  check_gradient_penalty_backward(grad_loss, grad_in, norms, weight, target);
  const auto strides = elementwise_strides(grad_in);
  const auto g = to_strides(grad_in, strides);
  auto dg = at::empty_strided(g.sizes(), strides, g.options());
  const int64_t N = g.size(0), per = g.numel() / N;
  if (g.numel() == 0) return dg;
  // scale_i = dloss 2 weight / N a_i (csrc/gradient_penalty.h), N values in plain code
  std::vector<float> scale(N);
  const double k = grad_loss.item<double>() * 2.0 * weight / N;
  const auto nc = norms.contiguous();
  const PenaltyTarget tgt = penalty_target(target);
  for (int64_t i = 0; i < N; ++i) scale[i] = sample_scale(k, nc.const_data_ptr<float>()[i], tgt);
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_backward_cpu", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pd = dg.mutable_data_ptr<scalar_t>();
    const float* ps = scale.data();
    at::parallel_for(0, g.numel(), kChunk, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e;) {  // runs within one sample share its scale
        const int64_t i = s / per, stop = std::min(e, (i + 1) * per);
        scale_run(pg, pd, s, stop, ps[i]);
        s = stop;
      }
    });
  });
  return dg;
}

// The penalty and its gradient for dloss = 1 in one task per sample: the sample's norm, then dg_i from
// the sample again, now from L1/L2 (csrc/gradient_penalty.h: the formulas; genkern/ops/gradient_penalty.py:
// when it runs). Same sums in the same order as gradient_penalty, so loss and norms are bit-identical,
// and dg is what gradient_penalty_backward gives for dloss = 1. Samples larger than half a core's cache,
// or fewer samples than threads, take the two kernels instead: the second read would come from memory
// anyway, and one task per sample would leave threads idle.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_penalty_and_grad(const at::Tensor& grad_in, double weight,
                                                                         std::optional<double> target) {
  check_gradient_penalty(grad_in, weight, target, "gradient_penalty_and_grad");
  const int64_t N = grad_in.size(0), per = grad_in.numel() / N;
  if (per * grad_in.element_size() > core_cache_bytes() / 2 || N < at::get_num_threads()) {
    auto [loss, norms] = gradient_penalty(grad_in, weight, target);
    auto dg = gradient_penalty_backward(at::ones({}, loss.options()), grad_in, norms, weight, target);
    return {loss, norms, dg};
  }
  const auto strides = elementwise_strides(grad_in);
  const auto g = to_strides(grad_in, strides);
  auto dg = at::empty_strided(g.sizes(), strides, g.options());
  auto norms = at::empty({N}, g.options().dtype(at::kFloat));
  float* pn = norms.data_ptr<float>();
  std::vector<double> part(N, 0.0);
  const double k = 2.0 * weight / N;
  const PenaltyTarget tgt = penalty_target(target);
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_and_grad_cpu", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pd = dg.mutable_data_ptr<scalar_t>();
    parallel_blocks(N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, per)), per * g.element_size(), [&](int64_t i) {
      double s = 0.0;
      for (int64_t b = 0; b < per; b += kChunk) s += sum_squares(pg + i * per, b, std::min(per, b + kChunk));
      pn[i] = static_cast<float>(std::sqrt(s));
      part[i] = penalty_term(s, tgt);
      scale_run(pg + i * per, pd + i * per, 0, per, sample_scale(k, pn[i], tgt));
    });
  });
  double loss = 0.0;
  for (int64_t i = 0; i < N; ++i) loss += part[i];
  return {loss_tensor(loss, weight, N, g.options()), norms, dg};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("gradient_penalty", &gradient_penalty);
  m.impl("gradient_penalty_backward", &gradient_penalty_backward);
  m.impl("gradient_penalty_and_grad", &gradient_penalty_and_grad);
}

}  // namespace genkern::cpu
