// Vector helpers for the CPU kernels: float32 compute over float32/float16/bfloat16 storage, and
// vectorised versions of the activations in activation.h. Written once, used by every CPU op.
#pragma once
#include <utility>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "activation.h"

namespace genkern::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// Loads/stores 2 * kVec elements as two float32 vectors (one full vector of a 16-bit type).
template <typename T>
struct VecIO {
  static constexpr int64_t kStep = 2 * kVec;
  static inline void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
  static inline void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};

template <>
struct VecIO<float> {
  static constexpr int64_t kStep = 2 * kVec;
  static inline void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVec);
  }
  static inline void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kVec);
  }
};

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// A per-element parameter that is either one scalar for the whole row (NCHW: per channel) or one
// value per lane read from an array (channels-last: the row runs over channels).
struct Broadcast {
  float v;
  Vec vec(int64_t) const { return Vec(v); }
  float at(int64_t) const { return v; }
};
struct PerLane {
  const float* p;
  Vec vec(int64_t i) const { return Vec::loadu(p + i); }
  float at(int64_t i) const { return p[i]; }
};

// sigmoid(u) = 1 / (1 + exp(-u)), the whole cost of SiLU on a CPU, in ~20 vector instructions.
// With e = exp(-|u|) in (0, 1] nothing overflows: sigmoid = 1 / (1 + e) for u >= 0, e / (1 + e) else.
// e = 2^t, t = -|u| log2(e) = n + f with f in [-1/2, 1/2]: 2^f by its degree-6 Taylor polynomial
// (truncation < 1.2e-7), 2^n added into the exponent bits; the reciprocal is the hardware estimate
// plus one Newton step. Relative error ~3e-7 for |u| < 16, ~1e-6 at the float32 limit |u| ~ 87.
inline Vec sigmoid(const Vec& u) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 uu = u;
  __m256 t = _mm256_mul_ps(_mm256_or_ps(uu, _mm256_set1_ps(-0.f)), _mm256_set1_ps(1.4426950408889634f));
  t = _mm256_max_ps(t, _mm256_set1_ps(-126.f));         // keeps 2^n normal; exp(-87) is ~0 anyway
  const __m256 magic = _mm256_set1_ps(12582912.f);      // 1.5 * 2^23: adding it rounds to an integer
  const __m256 r = _mm256_add_ps(t, magic);
  const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(r, magic));
  __m256 p = _mm256_set1_ps(1.5403530393381608e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // r's low mantissa bits hold n (two's complement); shifted into the exponent field they scale p.
  const __m256i n = _mm256_slli_epi32(_mm256_castps_si256(r), 23);
  const __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), n));
  const __m256 d = _mm256_add_ps(e, _mm256_set1_ps(1.f));
  __m256 rc = _mm256_rcp_ps(d);
  rc = _mm256_mul_ps(rc, _mm256_fnmadd_ps(d, rc, _mm256_set1_ps(2.f)));
  return Vec(_mm256_blendv_ps(rc, _mm256_mul_ps(e, rc), uu));  // blendv selects by u's sign bit
#else
  return Vec(1.f) / (Vec(1.f) + u.neg().exp());
#endif
}

template <Activation A>
struct ActVec;

template <>
struct ActVec<Activation::None> {
  static inline Vec f(const Vec& u) { return u; }
  static inline Vec df(const Vec&) { return Vec(1.f); }
};

template <>
struct ActVec<Activation::SiLU> {
  static inline Vec f(const Vec& u) { return u * sigmoid(u); }
  static inline Vec df(const Vec& u) {
    const Vec s = sigmoid(u);
    return s * (Vec(1.f) + u * (Vec(1.f) - s));
  }
};

template <>
struct ActVec<Activation::GeLU> {
  static inline Vec cdf(const Vec& u) {
    return Vec(0.5f) * (Vec(1.f) + (u * Vec(0.70710678118654752f)).erf());
  }
  static inline Vec f(const Vec& u) { return u * cdf(u); }
  static inline Vec df(const Vec& u) {
    const Vec pdf = Vec(0.39894228040143268f) * (Vec(-0.5f) * u * u).exp();
    return cdf(u) + u * pdf;
  }
};

}  // namespace genkern::cpu
