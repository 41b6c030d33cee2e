// gradient_penalty on CPU. Maths and checks in csrc/gradient_penalty.h.
// Forward: per-sample sums of squares, each sample split into chunks that threads take in any order,
// the chunks' float32 vector sums combined in double. Backward: dg = scale_i g, one pass.
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

std::tuple<at::Tensor, at::Tensor> gradient_penalty(const at::Tensor& grad_in, double weight,
                                                    std::optional<double> target) {
  check_gradient_penalty(grad_in, weight, target, "gradient_penalty");
  const auto g = to_strides(grad_in, elementwise_strides(grad_in));
  const int64_t N = g.size(0), per = g.numel() / N, chunks = std::max<int64_t>(1, (per + kChunk - 1) / kChunk);
  std::vector<double> part(N * chunks, 0.0);
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_cpu", [&] {
    using IO = VecIO<scalar_t>;
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    // small samples: several per task, so tiny gradients do not wake the other threads
    parallel_blocks(N * chunks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, std::min(per, kChunk))),
                    std::min(per, kChunk) * g.element_size(), [&](int64_t t) {
      const int64_t i = t / chunks, b = (t % chunks) * kChunk, e = std::min(per, b + kChunk);
      const scalar_t* p = pg + i * per;
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
      part[t] = s;
    });
  });
  // N values: plain loops, not ATen ops (each of which costs more than this whole tail)
  auto norms = at::empty({N}, g.options().dtype(at::kFloat));
  double loss = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += part[i * chunks + c];
    const double n = std::sqrt(s);
    norms.data_ptr<float>()[i] = static_cast<float>(n);
    loss += target.has_value() ? (n - *target) * (n - *target) : s;
  }
  auto out = at::empty({}, g.options().dtype(at::kFloat));
  out.data_ptr<float>()[0] = static_cast<float>(weight * loss / N);
  return {out, norms};
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
  for (int64_t i = 0; i < N; ++i) {
    const double n = nc.const_data_ptr<float>()[i];
    scale[i] = static_cast<float>(k * (!target.has_value() ? 1.0 : (n > 0 ? 1.0 - *target / n : 0.0)));
  }
  GENKERN_DISPATCH_FLOAT_TYPES(g.scalar_type(), "gradient_penalty_backward_cpu", [&] {
    using IO = VecIO<scalar_t>;
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pd = dg.mutable_data_ptr<scalar_t>();
    const float* ps = scale.data();
    at::parallel_for(0, g.numel(), kChunk, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e;) {  // runs within one sample share its scale
        const int64_t i = s / per, stop = std::min(e, (i + 1) * per);
        const Vec v(ps[i]);
        int64_t k = s;
        for (; k + IO::kStep <= stop; k += IO::kStep) {
          Vec a, c;
          IO::load(pg + k, a, c);
          IO::store(pd + k, a * v, c * v);
        }
        for (; k < stop; ++k) pd[k] = static_cast<scalar_t>(ps[i] * static_cast<float>(pg[k]));
        s = stop;
      }
    });
  });
  return dg;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("gradient_penalty", &gradient_penalty);
  m.impl("gradient_penalty_backward", &gradient_penalty_backward);
}

}  // namespace genkern::cpu
