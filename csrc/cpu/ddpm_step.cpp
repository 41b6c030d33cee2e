// ddpm_step and add_noise on CPU: one pass over memory, at::vec + at::parallel_for. Maths and
// checks in csrc/ddpm_step.h; the noise stream in csrc/philox.h.
// Work is split into blocks of kBlock elements (a multiple of 4, so a block starts on a Philox
// group): per block the normals are drawn into a small stack buffer (Philox in plain integer code
// that the compiler vectorises, Box-Muller with polynomial log and sincos), then the update runs over
// the block with the buffer hot in L1. No noise tensor is ever written.
#include <cstring>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"
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

// Cephes logf: log(1 + f) = f - f^2/2 + f^3 P(f) on [sqrt(1/2) - 1, sqrt(2) - 1], P = sum kLogC[k] f^k.
constexpr float kLogC[9] = {3.3333331174e-1f,  -2.4999993993e-1f, 2.0000714765e-1f,
                            -1.6668057665e-1f, 1.4249322787e-1f,  -1.2420140846e-1f,
                            1.1676998740e-1f,  -1.1514610310e-1f, 7.0376836292e-2f};

// log(u) for u in (0, 1), within 1 ulp: u = 2^e m with m in [sqrt(1/2), sqrt(2)), log m by the
// Cephes logf polynomial in f = m - 1, e ln 2 added in two parts. Plain code on purpose: it sits in
// loops over arrays that the compiler vectorises (at::vec's Sleef log costs twice as much here).
inline float log_unit(float u) {
  uint32_t b;
  std::memcpy(&b, &u, 4);
  // Subtracting the bits of sqrt(1/2) moves the exponent boundary there: no branch, so it vectorises.
  const uint32_t ix = b - 0x3F3504F3u;
  const float e = static_cast<float>(static_cast<int32_t>(ix) >> 23);
  const uint32_t mb = (ix & 0x007FFFFFu) + 0x3F3504F3u;
  float m;
  std::memcpy(&m, &mb, 4);
  const float f = m - 1.0f, z = f * f;
  // P(f) = sum c_k f^k by Estrin's scheme: short dependency chains for the vectorised loops
  const float f4 = z * z, f8 = f4 * f4;
  const float e03 = (kLogC[2] + kLogC[3] * f) * z + (kLogC[0] + kLogC[1] * f);
  const float e47 = (kLogC[6] + kLogC[7] * f) * z + (kLogC[4] + kLogC[5] * f);
  const float p = kLogC[8] * f8 + (e47 * f4 + e03);
  const float y = f * z * p - 0.5f * z + e * -2.12194440e-4f;
  return f + y + e * 0.693359375f;
}

// (sin, cos)(2 pi u) for u in [0, 1): 4u = q + r exactly (q the nearest integer, |r| <= 1/2), the
// angle r pi/2 in [-pi/4, pi/4] by the Cephes sinf/cosf polynomials, then the quadrant q.
inline void sincos_2pi(float u, float& sn, float& cs) {
  const float v = 4.0f * u;
  const float q = (v + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: rounds to the nearest integer
  const float a = (v - q) * 1.5707963267948966f, a2 = a * a;
  const float s = a + a * a2 * ((-1.9515295891e-4f * a2 + 8.3321608736e-3f) * a2 - 1.6666654611e-1f);
  const float c = 1.0f - 0.5f * a2 +
                  a2 * a2 * ((2.443315711809948e-5f * a2 - 1.388731625493765e-3f) * a2 + 4.166664568298827e-2f);
  const int32_t qi = static_cast<int32_t>(q);
  const float s_q = (qi & 1) ? c : s, c_q = (qi & 1) ? s : c;
  sn = (qi & 2) ? -s_q : s_q;
  cs = ((qi + 1) & 2) ? -c_q : c_q;
}

#if defined(CPU_CAPABILITY_AVX2)
// log_unit and sincos_2pi on 8 lanes: the same operations, in the same order, as the scalar versions.
inline __m256 log_unit_v(__m256 u) {
  const __m256i off = _mm256_set1_epi32(0x3F3504F3);
  const __m256i ix = _mm256_sub_epi32(_mm256_castps_si256(u), off);
  const __m256 e = _mm256_cvtepi32_ps(_mm256_srai_epi32(ix, 23));
  const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007FFFFF)), off));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f)), z = _mm256_mul_ps(f, f);
  // P(f) by Estrin's scheme (as log_unit): a third of Horner's dependency chain
  auto lin = [&](float a, float b) { return _mm256_fmadd_ps(_mm256_set1_ps(b), f, _mm256_set1_ps(a)); };
  const __m256 f4 = _mm256_mul_ps(z, z), f8 = _mm256_mul_ps(f4, f4);
  const __m256 e03 = _mm256_fmadd_ps(lin(kLogC[2], kLogC[3]), z, lin(kLogC[0], kLogC[1]));
  const __m256 e47 = _mm256_fmadd_ps(lin(kLogC[6], kLogC[7]), z, lin(kLogC[4], kLogC[5]));
  const __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kLogC[8]), f8, _mm256_fmadd_ps(e47, f4, e03));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(f, z), p);
  y = _mm256_fmadd_ps(_mm256_set1_ps(-0.5f), z, y);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

inline void sincos_2pi_v(__m256 u, __m256& sn, __m256& cs) {
  const __m256 v = _mm256_mul_ps(_mm256_set1_ps(4.0f), u);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 qm = _mm256_add_ps(v, magic);  // q in the low mantissa bits
  const __m256 a = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_sub_ps(qm, magic)), _mm256_set1_ps(1.5707963267948966f));
  const __m256 a2 = _mm256_mul_ps(a, a);
  __m256 ps = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), a2, _mm256_set1_ps(8.3321608736e-3f));
  ps = _mm256_fmadd_ps(ps, a2, _mm256_set1_ps(-1.6666654611e-1f));
  const __m256 s = _mm256_fmadd_ps(_mm256_mul_ps(a, a2), ps, a);
  __m256 pc = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), a2, _mm256_set1_ps(-1.388731625493765e-3f));
  pc = _mm256_fmadd_ps(pc, a2, _mm256_set1_ps(4.166664568298827e-2f));
  const __m256 c = _mm256_fmadd_ps(_mm256_mul_ps(a2, a2), pc, _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), a2, _mm256_set1_ps(1.0f)));
  const __m256i q = _mm256_castps_si256(qm);
  // bit 0 of q: swap sin and cos; bit 1: negate sin; bit 1 of q + 1: negate cos (sign bits moved to bit 31)
  const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));
  const __m256 s_q = _mm256_blendv_ps(s, c, odd), c_q = _mm256_blendv_ps(c, s, odd);
  const __m256 sign_s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(q, 1), 31));
  const __m256 sign_c = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_srli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 1), 31));
  sn = _mm256_xor_ps(s_q, sign_s);
  cs = _mm256_xor_ps(c_q, sign_c);
}

// Box-Muller on lanes (u0, u1, u2, u3) of 8 groups, stored as their 32 normals in element order.
inline void box_muller_x8(__m256 u0, __m256 u1, __m256 u2, __m256 u3, float* z) {
  const __m256 m2 = _mm256_set1_ps(-2.0f);
  const __m256 r01 = _mm256_sqrt_ps(_mm256_mul_ps(m2, log_unit_v(u0)));
  const __m256 r23 = _mm256_sqrt_ps(_mm256_mul_ps(m2, log_unit_v(u2)));
  __m256 s01, c01, s23, c23;
  sincos_2pi_v(u1, s01, c01);
  sincos_2pi_v(u3, s23, c23);
  const __m256 z0 = _mm256_mul_ps(r01, c01), z1 = _mm256_mul_ps(r01, s01);
  const __m256 z2 = _mm256_mul_ps(r23, c23), z3 = _mm256_mul_ps(r23, s23);
  // 4 x 8 transpose: lane k of group j goes to z[4 j + k]
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 q0 = _mm256_shuffle_ps(t0, t2, 0x44), q1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 q2 = _mm256_shuffle_ps(t1, t3, 0x44), q3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(q0, q1, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
}
#endif

// z[0 .. 4 * groups) = the normals of Philox groups g0 .. g0 + groups of the stream (seed, offset).
void philox_normal_block(uint64_t seed, uint64_t offset, uint64_t g0, int64_t groups, float* z) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if (groups >= 16) {
    const PhiloxKeysX8 keys(seed);
    for (; j + 16 <= groups; j += 16) {
      __m256 u[8];
      philox_uniform4_x16(keys, offset, g0 + j, u);
      box_muller_x8(u[0], u[1], u[2], u[3], z + 4 * j);
      box_muller_x8(u[4], u[5], u[6], u[7], z + 4 * j + 32);
    }
  }
#endif
  for (; j < groups; ++j) {  // the scalar path: the same maths one group at a time
    uint32_t r0 = static_cast<uint32_t>(g0 + j), r1 = static_cast<uint32_t>((g0 + j) >> 32);
    uint32_t r2 = static_cast<uint32_t>(offset), r3 = static_cast<uint32_t>(offset >> 32);
    philox4x32_10(r0, r1, r2, r3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const float rad01 = std::sqrt(-2.0f * log_unit(philox_uniform(r0)));
    const float rad23 = std::sqrt(-2.0f * log_unit(philox_uniform(r2)));
    float s01, c01, s23, c23;
    sincos_2pi(philox_uniform(r1), s01, c01);
    sincos_2pi(philox_uniform(r3), s23, c23);
    z[4 * j] = rad01 * c01;
    z[4 * j + 1] = rad01 * s01;
    z[4 * j + 2] = rad23 * c23;
    z[4 * j + 3] = rad23 * s23;
  }
}

template <typename T>
struct Ptrs {
  const T *m, *mc, *x, *noise, *mask, *known;
  T* out;
  bool stream;  // streaming stores for out (vec.h: stream_outputs)
};

template <typename T>
void prefetch_block(const Ptrs<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (const T* q : {p.m, p.mc, p.x, p.mask, p.known})
    if (q)
      for (int64_t i = begin; i < end; i += kLine) __builtin_prefetch(q + i);
}

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
    store_out(p.out + i, y0, y1, p.stream);
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
    const int64_t streams = 1 + (p.mc != nullptr) + (p.noise != nullptr) + 2 * (p.mask != nullptr);
    p.stream = stream_outputs((streams + 1) * n * call.sample.element_size());
    const auto& c = call.coefs;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    parallel_blocks(blocks, 16, kBlock * call.sample.element_size(), [&](int64_t b) {
      alignas(64) float zbuf[kBlock];
      const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
      if (call.philox) {
        // the noise is pure arithmetic: fetch the block's operands meanwhile, so that the update
        // after it finds them in L1 even when they come from DRAM
        prefetch_block(p, begin, end);
        philox_normal_block(call.seed, call.offset, begin / 4, (end - begin + 3) / 4, zbuf);
      }
      ddpm_step_block(c, p, call.philox ? zbuf : nullptr, begin, end);
      if (p.stream) stream_fence();
    });
  });
  return call.out;
}

// x_t = sqrt(alpha_bar[t_b]) x0 + sqrt(1 - alpha_bar[t_b]) noise, per-sample coefficients.
at::Tensor add_noise_cpu(const at::Tensor& original, const at::Tensor& noise, const at::Tensor& sqrt_alpha_prod,
                         const at::Tensor& sqrt_one_minus_alpha_prod) {
  auto call = prepare_add_noise(original, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod);
  const auto &x0 = call.original, &z = call.noise, &sa = call.sa, &s1 = call.s1;
  auto& out = call.out;
  const int64_t n = x0.numel();
  if (n == 0) return out;
  const int64_t per_sample = n / x0.size(0);
  GENKERN_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "add_noise_cpu", [&] {
    using IO = VecIO<scalar_t>;
    const scalar_t *px = x0.const_data_ptr<scalar_t>(), *pz = z.const_data_ptr<scalar_t>();
    const float *pa = sa.const_data_ptr<float>(), *pb = s1.const_data_ptr<float>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const bool stream = stream_outputs(3 * n * x0.element_size());
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
          store_out(po + i, va * x0a + vc * za, va * x0b + vc * zb, stream);
        }
        for (; i < e; ++i) po[i] = static_cast<scalar_t>(a * static_cast<float>(px[i]) + c * static_cast<float>(pz[i]));
        s = e;
      }
      stream_fence();
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
