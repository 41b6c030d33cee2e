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

// 1 / d for d >= 1 (a sigmoid's denominator). The hardware estimate plus one Newton step is good to
// ~2 ulp and several times cheaper than a division, which would dominate SiLU otherwise.
inline Vec reciprocal_ge1(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(d);
  return Vec(_mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f))));
#else
  return Vec(1.f) / d;
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
  // exp_u20 (ATen's polynomial exp, <= 20 ulp, clamped) rather than Sleef's: the exponential is
  // the whole cost of SiLU on a CPU, and its error is far below the fp32 rounding of y.
  static inline Vec sigmoid(const Vec& u) { return reciprocal_ge1(Vec(1.f) + u.neg().exp_u20()); }
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
