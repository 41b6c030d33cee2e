// ddpm_step and add_noise on CPU: one pass over memory, at::vec + at::parallel_for. Maths and
// checks in csrc/ddpm_step.h; the noise stream in csrc/philox.h.
// Work is split into blocks of kBlock elements (a multiple of 4, so a block starts on a Philox
// group): per block the normals are drawn into a small stack buffer (Philox in plain integer code
// that the compiler vectorises, Box-Muller with at::vec's log/sin/cos), then the update runs over
// the block with the buffer hot in L1. No noise tensor is ever written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/vec.h"
#include "ddpm_step.h"
#include "dispatch.h"

namespace genkern {
template <>
struct ClampRange<cpu::Vec> {
  static cpu::Vec apply(const cpu::Vec& v, float r) { return at::vec::clamp(v, cpu::Vec(-r), cpu::Vec(r)); }
};
}  // namespace genkern

namespace genkern::cpu {
namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kGroups = kBlock / 4;
static_assert(kGroups % kVec == 0, "Box-Muller runs on whole vectors of groups");

// z[0 .. 4 * groups) = the normals of Philox groups g0 .. g0 + groups of the stream (seed, offset).
void philox_normal_block(uint64_t seed, uint64_t offset, uint64_t g0, int64_t groups, float* z) {
  alignas(64) float u[4][kGroups];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  const int64_t padded = (groups + kVec - 1) / kVec * kVec;
  for (int64_t j = 0; j < padded; ++j) {  // straight-line integer code: vectorised by the compiler
    const uint64_t g = g0 + j;
    uint32_t r0 = static_cast<uint32_t>(g), r1 = static_cast<uint32_t>(g >> 32), r2 = c2, r3 = c3;
    philox4x32_10(r0, r1, r2, r3, k0, k1);
    u[0][j] = philox_uniform(r0);
    u[1][j] = philox_uniform(r1);
    u[2][j] = philox_uniform(r2);
    u[3][j] = philox_uniform(r3);
  }
  alignas(64) float zl[4][kGroups];
  const Vec minus_two(-2.0f), two_pi(6.283185307179586f);
  for (int64_t j = 0; j < padded; j += kVec) {
    for (int k = 0; k < 4; k += 2) {
      const Vec radius = (minus_two * Vec::loadu(&u[k][j]).log()).sqrt();
      const Vec theta = two_pi * Vec::loadu(&u[k + 1][j]);
      (radius * theta.cos()).store(&zl[k][j]);
      (radius * theta.sin()).store(&zl[k + 1][j]);
    }
  }
  for (int64_t j = 0; j < groups; ++j)
    for (int k = 0; k < 4; ++k) z[4 * j + k] = zl[k][j];
}

template <typename T>
struct Ptrs {
  const T *m, *mc, *x, *noise, *mask, *known;
  T* out;
};

template <typename T>
void ddpm_step_block(const DdpmStepCoefs& c, const Ptrs<T>& p, const float* zbuf, int64_t begin, int64_t end) {
  using IO = VecIO<T>;
  const Vec w(c.w), k_x0(c.k_x0), k_z(c.k_z);
  auto load = [](const T* q, int64_t i, Vec& a, Vec& b) { IO::load(q + i, a, b); };
  int64_t i = begin;
  for (; i + IO::kStep <= end; i += IO::kStep) {
    Vec m0, m1, x0, x1, z0(0.0f), z1(0.0f);
    load(p.m, i, m0, m1);
    if (c.cfg) {
      Vec g0, g1;
      load(p.mc, i, g0, g1);
      m0 = m0 + w * (g0 - m0);
      m1 = m1 + w * (g1 - m1);
    }
    load(p.x, i, x0, x1);
    if (zbuf) {
      z0 = Vec::loadu(zbuf + (i - begin));
      z1 = Vec::loadu(zbuf + (i - begin) + kVec);
    } else if (p.noise) {
      load(p.noise, i, z0, z1);
    }
    Vec y0 = ddpm_step_unknown(c, m0, x0, z0), y1 = ddpm_step_unknown(c, m1, x1, z1);
    if (c.masked) {
      Vec a0, a1, k0, k1;
      load(p.mask, i, a0, a1);
      load(p.known, i, k0, k1);
      y0 = y0 + a0 * (k_x0 * k0 + k_z * z0 - y0);
      y1 = y1 + a1 * (k_x0 * k1 + k_z * z1 - y1);
    }
    IO::store(p.out + i, y0, y1);
  }
  for (; i < end; ++i) {
    float m = static_cast<float>(p.m[i]);
    if (c.cfg) m += c.w * (static_cast<float>(p.mc[i]) - m);
    const float z = zbuf ? zbuf[i - begin] : (p.noise ? static_cast<float>(p.noise[i]) : 0.0f);
    float y = ddpm_step_unknown(c, m, static_cast<float>(p.x[i]), z);
    if (c.masked) y += static_cast<float>(p.mask[i]) * (c.k_x0 * static_cast<float>(p.known[i]) + c.k_z * z - y);
    p.out[i] = static_cast<T>(y);
  }
}

at::Tensor ddpm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                         const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& known, c10::string_view prediction_type,
                         double sqrt_alpha_prod, double sqrt_one_minus_alpha_prod, std::optional<double> clip_range,
                         bool recompute_eps, double coef_x0, double coef_eps, double coef_sample, double sigma,
                         double known_coef, double known_noise_coef, std::optional<double> guidance_scale,
                         std::optional<int64_t> seed, int64_t offset) {
  auto call = prepare_ddpm_step(model_output, sample, noise, mask, known, std::string(prediction_type),
                                sqrt_alpha_prod, sqrt_one_minus_alpha_prod, clip_range, recompute_eps, coef_x0,
                                coef_eps, coef_sample, sigma, known_coef, known_noise_coef, guidance_scale, seed,
                                offset);
  const int64_t n = call.sample.numel();
  if (n == 0) return call.out;
  GENKERN_DISPATCH_FLOAT_TYPES(call.sample.scalar_type(), "ddpm_step_cpu", [&] {
    Ptrs<scalar_t> p;
    p.m = call.model_output.const_data_ptr<scalar_t>();
    p.mc = call.coefs.cfg ? p.m + n : nullptr;
    p.x = call.sample.const_data_ptr<scalar_t>();
    p.noise = call.coefs.noise && call.noise.defined() ? call.noise.const_data_ptr<scalar_t>() : nullptr;
    p.mask = call.coefs.masked ? call.mask.const_data_ptr<scalar_t>() : nullptr;
    p.known = call.coefs.masked ? call.known.const_data_ptr<scalar_t>() : nullptr;
    p.out = call.out.mutable_data_ptr<scalar_t>();
    const auto& c = call.coefs;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      alignas(64) float zbuf[kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        if (call.philox) philox_normal_block(call.seed, call.offset, begin / 4, (end - begin + 3) / 4, zbuf);
        ddpm_step_block(c, p, call.philox ? zbuf : nullptr, begin, end);
      }
    });
  });
  return call.out;
}

// x_t = sqrt(alpha_bar[t_b]) x0 + sqrt(1 - alpha_bar[t_b]) noise, per-sample coefficients.
at::Tensor add_noise_cpu(const at::Tensor& original, const at::Tensor& noise, const at::Tensor& sqrt_alpha_prod,
                         const at::Tensor& sqrt_one_minus_alpha_prod) {
  check_add_noise(original, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod);
  const auto strides = ddpm_kernel_strides(original);
  const auto x0 = to_strides(original, strides), z = to_strides(noise, strides);
  auto out = at::empty_strided(original.sizes(), strides, original.options());
  const int64_t n = x0.numel();
  if (n == 0) return out;
  const int64_t per_sample = n / x0.size(0);
  const auto sa = sqrt_alpha_prod.contiguous(), s1 = sqrt_one_minus_alpha_prod.contiguous();
  GENKERN_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "add_noise_cpu", [&] {
    using IO = VecIO<scalar_t>;
    const scalar_t *px = x0.const_data_ptr<scalar_t>(), *pz = z.const_data_ptr<scalar_t>();
    const float *pa = sa.const_data_ptr<float>(), *pb = s1.const_data_ptr<float>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end;) {  // one run per sample: the coefficients are constant on it
        const int64_t b = s / per_sample, e = std::min(end, (b + 1) * per_sample);
        const float a = pa[b], c = pb[b];
        const Vec va(a), vc(c);
        int64_t i = s;
        for (; i + IO::kStep <= e; i += IO::kStep) {
          Vec x0a, x0b, za, zb;
          IO::load(px + i, x0a, x0b);
          IO::load(pz + i, za, zb);
          IO::store(po + i, va * x0a + vc * za, va * x0b + vc * zb);
        }
        for (; i < e; ++i) po[i] = static_cast<scalar_t>(a * static_cast<float>(px[i]) + c * static_cast<float>(pz[i]));
        s = e;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("add_noise", &add_noise_cpu);
}

}  // namespace genkern::cpu
