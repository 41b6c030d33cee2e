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

#if defined(GENKERN_SIMD)
// log_unit and sincos_2pi on every lane (cpu/simd.h): the same operations, in the same order, as the
// scalar versions.
inline simd::F log_unit_v(simd::F u) {
  using namespace simd;
  const I off = splat(0x3F3504F3u);
  const I ix = GK_MM(sub_epi32)(as_int(u), off);
  const F e = GK_MM(cvtepi32_ps)(GK_MM(srai_epi32)(ix, 23));
  const F m = as_float(GK_MM(add_epi32)(bit_and(ix, splat(0x007FFFFFu)), off));
  const F f = GK_MM(sub_ps)(m, splat(1.0f)), z = GK_MM(mul_ps)(f, f);
  // P(f) by Estrin's scheme (as log_unit): a third of Horner's dependency chain
  auto lin = [&](float a, float b) { return GK_MM(fmadd_ps)(splat(b), f, splat(a)); };
  const F f4 = GK_MM(mul_ps)(z, z), f8 = GK_MM(mul_ps)(f4, f4);
  const F e03 = GK_MM(fmadd_ps)(lin(kLogC[2], kLogC[3]), z, lin(kLogC[0], kLogC[1]));
  const F e47 = GK_MM(fmadd_ps)(lin(kLogC[6], kLogC[7]), z, lin(kLogC[4], kLogC[5]));
  const F p = GK_MM(fmadd_ps)(splat(kLogC[8]), f8, GK_MM(fmadd_ps)(e47, f4, e03));
  F y = GK_MM(mul_ps)(GK_MM(mul_ps)(f, z), p);
  y = GK_MM(fmadd_ps)(splat(-0.5f), z, y);
  y = GK_MM(fmadd_ps)(e, splat(-2.12194440e-4f), y);
  return GK_MM(fmadd_ps)(e, splat(0.693359375f), GK_MM(add_ps)(f, y));
}

inline void sincos_2pi_v(simd::F u, simd::F& sn, simd::F& cs) {
  using namespace simd;
  const F v = GK_MM(mul_ps)(splat(4.0f), u);
  const F magic = splat(12582912.0f);
  const F qm = GK_MM(add_ps)(v, magic);  // q in the low mantissa bits
  const F a = GK_MM(mul_ps)(GK_MM(sub_ps)(v, GK_MM(sub_ps)(qm, magic)), splat(1.5707963267948966f));
  const F a2 = GK_MM(mul_ps)(a, a);
  F ps = GK_MM(fmadd_ps)(splat(-1.9515295891e-4f), a2, splat(8.3321608736e-3f));
  ps = GK_MM(fmadd_ps)(ps, a2, splat(-1.6666654611e-1f));
  const F s = GK_MM(fmadd_ps)(GK_MM(mul_ps)(a, a2), ps, a);
  F pc = GK_MM(fmadd_ps)(splat(2.443315711809948e-5f), a2, splat(-1.388731625493765e-3f));
  pc = GK_MM(fmadd_ps)(pc, a2, splat(4.166664568298827e-2f));
  const F c = GK_MM(fmadd_ps)(GK_MM(mul_ps)(a2, a2), pc, GK_MM(fnmadd_ps)(splat(0.5f), a2, splat(1.0f)));
  const I q = as_int(qm);
  // quadrant q: odd swaps sin and cos; bit 1 of q negates sin, bit 1 of q + 1 negates cos
  const F s_q = select_odd(q, c, s), c_q = select_odd(q, s, c);
  const F sign_s = as_float(GK_MM(slli_epi32)(GK_MM(srli_epi32)(q, 1), 31));
  const F sign_c = as_float(GK_MM(slli_epi32)(GK_MM(srli_epi32)(GK_MM(add_epi32)(q, splat(1u)), 1), 31));
  sn = GK_MM(xor_ps)(s_q, sign_s);
  cs = GK_MM(xor_ps)(c_q, sign_c);
}

// Box-Muller on lanes (u0, u1, u2, u3) of kLanes groups, stored as their 4 kLanes normals in element
// order: a 4 x 4 transpose within each 128-bit block, then the blocks put in group order.
inline void box_muller_v(simd::F u0, simd::F u1, simd::F u2, simd::F u3, float* z) {
  using namespace simd;
  const F m2 = splat(-2.0f);
  const F r01 = GK_MM(sqrt_ps)(GK_MM(mul_ps)(m2, log_unit_v(u0)));
  const F r23 = GK_MM(sqrt_ps)(GK_MM(mul_ps)(m2, log_unit_v(u2)));
  F s01, c01, s23, c23;
  sincos_2pi_v(u1, s01, c01);
  sincos_2pi_v(u3, s23, c23);
  const F z0 = GK_MM(mul_ps)(r01, c01), z1 = GK_MM(mul_ps)(r01, s01);
  const F z2 = GK_MM(mul_ps)(r23, c23), z3 = GK_MM(mul_ps)(r23, s23);
  // qk: block b holds the 4 normals of group 4 b + k
  const F t0 = GK_MM(unpacklo_ps)(z0, z1), t1 = GK_MM(unpackhi_ps)(z0, z1);
  const F t2 = GK_MM(unpacklo_ps)(z2, z3), t3 = GK_MM(unpackhi_ps)(z2, z3);
  const F q0 = GK_MM(shuffle_ps)(t0, t2, 0x44), q1 = GK_MM(shuffle_ps)(t0, t2, 0xEE);
  const F q2 = GK_MM(shuffle_ps)(t1, t3, 0x44), q3 = GK_MM(shuffle_ps)(t1, t3, 0xEE);
#if defined(CPU_CAPABILITY_AVX512)
  // output vector b = block b of q0, q1, q2, q3
  const F r0 = _mm512_shuffle_f32x4(q0, q1, 0x44), r1 = _mm512_shuffle_f32x4(q2, q3, 0x44);
  const F r2 = _mm512_shuffle_f32x4(q0, q1, 0xEE), r3 = _mm512_shuffle_f32x4(q2, q3, 0xEE);
  _mm512_storeu_ps(z, _mm512_shuffle_f32x4(r0, r1, 0x88));
  _mm512_storeu_ps(z + 16, _mm512_shuffle_f32x4(r0, r1, 0xDD));
  _mm512_storeu_ps(z + 32, _mm512_shuffle_f32x4(r2, r3, 0x88));
  _mm512_storeu_ps(z + 48, _mm512_shuffle_f32x4(r2, r3, 0xDD));
#else
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(q0, q1, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
#endif
}
#endif

// z[0 .. 4 * groups) = the normals of Philox groups g0 .. g0 + groups of the stream (seed, offset).
void philox_normal_block(uint64_t seed, uint64_t offset, uint64_t g0, int64_t groups, float* z) {
  int64_t j = 0;
#if defined(GENKERN_SIMD)
  constexpr int64_t kL = simd::kLanes;
  if (groups >= 2 * kL) {
    const PhiloxKeysV keys(seed);
    for (; j + 2 * kL <= groups; j += 2 * kL) {
      simd::F u[8];
      philox_uniform4_2v(keys, offset, g0 + j, u);
      box_muller_v(u[0], u[1], u[2], u[3], z + 4 * j);
      box_muller_v(u[4], u[5], u[6], u[7], z + 4 * j + 4 * kL);
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
