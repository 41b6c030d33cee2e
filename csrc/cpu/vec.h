// Vector helpers for the CPU kernels: float32 compute over float32/float16/bfloat16 storage, and
// vectorised versions of the activations in activation.h. Written once, used by every CPU op.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "activation.h"
#include "cpu/simd.h"

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

// The m < kStep values at p as two vectors, zero-padded; and the first m lanes of two vectors
// stored at p: one vector step over the last values of a run. With SIMD, at::vec's partial loads and
// stores (masked on AVX-512; AVX2 goes through a zeroed buffer as the plain build does here). Always
// inlined: called, they were a quarter of a 4x4 pixel norm.
template <typename T>
C10_ALWAYS_INLINE void load_padded(const T* p, int64_t m, Vec& a, Vec& b) {
#if defined(GENKERN_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p, std::min(m, kVec));
    b = m > kVec ? Vec::loadu(p + kVec, m - kVec) : Vec(0.f);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, m));
  }
#else
  T t[VecIO<T>::kStep] = {};
  std::copy(p, p + m, t);
  VecIO<T>::load(t, a, b);
#endif
}
template <typename T>
C10_ALWAYS_INLINE void store_first(T* p, int64_t m, const Vec& a, const Vec& b) {
#if defined(GENKERN_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    a.store(p, std::min(m, kVec));
    if (m > kVec) b.store(p + kVec, m - kVec);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p, m);
  }
#else
  T t[VecIO<T>::kStep];
  VecIO<T>::store(t, a, b);
  std::copy(t, t + m, p);
#endif
}

// Outputs that are written once and not read back by the op. When the op's footprint (inputs and
// outputs) is well beyond the last-level cache, y's lines are evicted before anyone reads them, and an
// ordinary store first reads each line from DRAM (read-for-ownership): three passes of traffic for a
// read-one-write-one op. Streaming stores skip that read (what memcpy does for large sizes): on this
// kind of CPU a 32 MB copy runs 1.4x faster with them. Near the cache size they lose: a footprint that
// half fits would otherwise be served from cache when the op runs again, so the bar is twice the cache.
// They also lose when much arithmetic sits between the stores (GroupNorm+SiLU's sigmoid computed in
// the storing loop: 8x512x32x32 forward 2.5 -> 4.5 ms): lines leave the write-combining buffers half
// written. Light loops only: GroupNorm+SiLU streams y from the light second loop of its two-pass
// SiLU, which writes 1 KB runs (4x512x64x64 forward 3.2-3.4 -> 2.9 ms, channels-last 5.3-5.4 ->
// 4.6-4.8 ms with whole samples shared by the threads; backward 4-12% faster at that shape).
// The largest cache of cpu0 with a level in [min_level, max_level], from Linux sysfs (what lscpu
// shows); 0 when sysfs is absent.
inline int64_t sysfs_cache_bytes(int min_level, int max_level) {
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(level >> lv) || !(size >> sz) || sz.empty()) continue;
    int64_t v = std::atoll(sz.c_str());
    if (sz.back() == 'K') v <<= 10;
    if (sz.back() == 'M') v <<= 20;
    if (lv >= min_level && lv <= max_level && v > best) best = v;
  }
  return best;
}
// The last-level cache this thread shares, from sysfs (on AMD parts the cache of one core complex;
// glibc's sysconf reports the whole package's L3 there, 16x too much for the decision below), but at
// most 12 MiB per CPU this process sees: a VM sees its host's whole L3 and not the neighbours that
// share it (the Xeon CI machine: 2 vCPUs, a 504 MB L3). There, in the bench's interleaved rounds,
// streaming stores lost at 16-32 MB footprints (pixel norm 64x512x8x8 forward 41-43 -> 26 GB/s,
// GroupNorm+SiLU 8x512x32x32 forward 35-39 -> 32-33) and won from 48 MB (pixel norm 16x512x32x32
// forward+backward 25.8 -> 27.5-29.8 GB/s): the cache this VM can count on is ~24 MB. The cap leaves
// the EPYC's 16 MB core complex and bare-metal parts as they were. 16 MiB when sysfs is absent.
// GENKERN_LLC_BYTES overrides both.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("GENKERN_LLC_BYTES")) return static_cast<int64_t>(std::atoll(env));
    const int64_t b = sysfs_cache_bytes(2, 9);
    const int64_t cpus = std::max<int64_t>(1, std::thread::hardware_concurrency());
    return b > 0 ? std::min(b, cpus * (int64_t{12} << 20)) : int64_t{16} << 20;
  }();
  return bytes;
}
// A core's own L2 (512 KB on the EPYC, 2 MB on the Xeon); 512 KB when sysfs is absent.
inline int64_t core_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t b = sysfs_cache_bytes(2, 2);
    return b > 0 ? b : int64_t{512} << 10;
  }();
  return bytes;
}
inline bool stream_outputs(int64_t footprint_bytes) { return footprint_bytes >= 2 * last_level_cache_bytes(); }

// VecIO<T>::store, or a streaming store when `stream` and p is aligned to a vector. A task that
// streamed calls stream_fence() before it ends (streaming stores are weakly ordered).
template <typename T>
inline void store_out(T* p, const Vec& a, const Vec& b, bool stream) {
#if defined(GENKERN_SIMD)
  if (stream && reinterpret_cast<uintptr_t>(p) % sizeof(simd::F) == 0) {
    if constexpr (std::is_same_v<T, float>) {
      GK_MM(stream_ps)(p, a);
      GK_MM(stream_ps)(p + kVec, b);
    } else {
      simd::stream(reinterpret_cast<simd::I*>(p), at::vec::convert_from_float<T>(a, b));
    }
    return;
  }
#endif
  VecIO<T>::store(p, a, b);
}

// Walks a run of n values in vector steps: step(i, load, store) for each step, at i = 0, kStep, ...;
// load(p, a, b) and store(p, a, b) move that step's 2 kVec values of any array (T or float) at p:
// VecIO's loads and store_out for the whole steps, load_padded and store_first of the m < kStep
// remaining values for the last one; load.param(P, i, a, b) gives a per-element parameter's (Broadcast,
// PerLane, ScaledLane below) values for the step at i, as P.vec or, in the last step, P.padded. So each
// loop body is written once for both.
struct WholeStepLoad {
  template <typename U>
  C10_ALWAYS_INLINE void operator()(const U* p, Vec& a, Vec& b) const { VecIO<U>::load(p, a, b); }
  template <typename P>
  C10_ALWAYS_INLINE void param(const P& k, int64_t i, Vec& a, Vec& b) const {
    a = k.vec(i);
    b = k.vec(i + kVec);
  }
};
struct PaddedStepLoad {
  int64_t m;
  template <typename U>
  C10_ALWAYS_INLINE void operator()(const U* p, Vec& a, Vec& b) const { load_padded(p, m, a, b); }
  template <typename P>
  C10_ALWAYS_INLINE void param(const P& k, int64_t i, Vec& a, Vec& b) const { k.padded(i, m, a, b); }
};
template <typename T, typename Step>
C10_ALWAYS_INLINE void for_each_step(int64_t n, bool stream, const Step& step) {
  const auto store = [stream](auto* p, const Vec& a, const Vec& b) { store_out(p, a, b, stream); };
  int64_t i = 0;
  for (; i + VecIO<T>::kStep <= n; i += VecIO<T>::kStep) step(i, WholeStepLoad{}, store);
  if (const int64_t m = n - i; m > 0)
    step(i, PaddedStepLoad{m}, [m](auto* p, const Vec& a, const Vec& b) { store_first(p, m, a, b); });
}

inline void stream_fence() {
#if defined(GENKERN_SIMD)
  _mm_sfence();
#endif
}

// Asks for the cache line holding p (into L1) without waiting for it.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
// ... to be written: the line arrives owned, so that a store to it does not wait (prefetchw).
inline void prefetch_for_write(void* p) { __builtin_prefetch(p, 1, 3); }
// ... into L2 only (prefetcht1): for a stream read some way ahead of its use.
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// A per-element parameter that is either one scalar for the whole row (NCHW: per channel) or one
// value per lane read from an array (channels-last: the row runs over channels).
// padded(i, m, lo, hi): the 2 kVec values from i as vec(i) and vec(i + kVec) give them, of which
// only the first m < 2 kVec exist (the rest is padding: zero, or the broadcast value).
struct Broadcast {
  float v;
  Vec vec(int64_t) const { return Vec(v); }
  float at(int64_t) const { return v; }
  void padded(int64_t, int64_t, Vec& lo, Vec& hi) const { lo = hi = Vec(v); }
};
struct PerLane {
  const float* p;
  Vec vec(int64_t i) const { return Vec::loadu(p + i); }
  float at(int64_t i) const { return p[i]; }
  void padded(int64_t i, int64_t m, Vec& lo, Vec& hi) const { load_padded(p + i, m, lo, hi); }
};
// A per-lane array times one scalar (NCHW short rows: a = rstd w[c] with w repeated along the rows).
struct ScaledLane {
  const float* p;
  float s;
  Vec vec(int64_t i) const { return Vec(s) * Vec::loadu(p + i); }
  float at(int64_t i) const { return s * p[i]; }
  void padded(int64_t i, int64_t m, Vec& lo, Vec& hi) const {
    load_padded(p + i, m, lo, hi);
    lo = Vec(s) * lo;
    hi = Vec(s) * hi;
  }
};
constexpr float kLog2e = 1.4426950408889634f;

// sigmoid(u) = 1 / (1 + e) with e = exp(-u): the whole cost of SiLU on a CPU.
// e = 2^t, t = -u log2(e) (callers fold -log2(e) into their own FMA and pass t), clamped to at most
// 126 (AVX2: to [-126, 126]) so that nothing overflows; past the clamp sigmoid is 0 or 1 to float32
// precision anyway (|u| > 87). t = n + f with n an integer (simd::exp2_split: floor(t) on AVX-512,
// round(t) on AVX2); 2^f by a degree-5 polynomial with p(0) = 1 fitted for least maximum relative
// error on f's interval (simd::kExp2Poly; ~8e-8 in exact arithmetic, ~2e-7 evaluated in float32),
// times 2^n (simd::times_pow2). The reciprocal is the hardware estimate plus one Newton step.
// Relative error of SiLU < 1e-6 for |u| <= 16; beyond, the float32 rounding of t (up to 2^-18 |t|)
// enters exp: up to ~5e-6, on values below 2e-6.
// Taking e = exp(-u) itself, clamped, rather than the usual overflow-free exp(-|u|) saves the select
// between 1 / (1 + e) and e / (1 + e) and its multiply: 2 of ~36 instructions per vector.
// Written for a short dependency chain: on this kind of core (AMD Zen 2) a loop whose per-vector chain
// is longer keeps too few vectors in flight and runs at half the ports' rate, which is why GroupNorm's
// loops run the exponential and the rest as two passes, and split the exponential itself in two
// (exp2_reduce, exp2_finish) so that a loop can overlap one vector's range reduction with the previous
// one's polynomial (silu_two_pass). Degree 5 with a second-order Estrin split, vroundps instead of the
// add-subtract rounding trick, and log2(e) folded into the caller's FMA took 16 -> 12 cycles per 8
// values (one thread, in L1); the pipelining and exp(-u) 12.0 -> 10.3.
struct Exp2Parts {
  Vec f, n;  // 2^t = 2^f 2^n, as simd::exp2_split gives them
};

inline Exp2Parts exp2_reduce(const Vec& t) {
#if defined(GENKERN_SIMD)
  simd::F f, n;
  simd::exp2_split(t, f, n);
  return {Vec(f), Vec(n)};
#else
  return {at::vec::clamp(t, Vec(-126.f), Vec(126.f)), Vec(0.f)};
#endif
}

inline Vec exp2_finish(const Exp2Parts& e) {
#if defined(GENKERN_SIMD)
  using namespace simd;
  constexpr const float* c = kExp2Poly;
  const F f = e.f, f2 = GK_MM(mul_ps)(f, f);
  auto lin = [&](float c0, float c1) { return GK_MM(fmadd_ps)(splat(c1), f, splat(c0)); };
  F p = GK_MM(fmadd_ps)(lin(c[4], c[5]), f2, lin(c[2], c[3]));
  p = GK_MM(fmadd_ps)(p, f2, lin(c[0], c[1]));
  return Vec(times_pow2(p, e.n));
#else
  return (e.f * Vec(0.6931471805599453f)).exp();
#endif
}

// 2^t, t clamped to [-126, 126]
inline Vec exp2_clamped(const Vec& t) { return exp2_finish(exp2_reduce(t)); }

// exp(-u), clamped as exp2_clamped
inline Vec exp_neg(const Vec& u) { return exp2_clamped(u * Vec(-kLog2e)); }

// sigmoid(u) = 1 / (1 + e) from e = exp_neg(u)
inline Vec sigmoid_from_exp(const Vec& e) {
#if defined(GENKERN_SIMD)
  using namespace simd;
  const F d = GK_MM(add_ps)(e, splat(1.f));
  const F rc = rcp_estimate(d);
  return Vec(GK_MM(mul_ps)(rc, GK_MM(fnmadd_ps)(d, rc, splat(2.f))));
#else
  return Vec(1.f) / (Vec(1.f) + e);
#endif
}

// silu(u) = u / (1 + e) from e = exp_neg(u), the Newton step of the reciprocal applied to the
// product (one dependent multiply fewer than u times sigmoid_from_exp).
inline Vec silu_from_exp(const Vec& u, const Vec& e) {
#if defined(GENKERN_SIMD)
  using namespace simd;
  const F d = GK_MM(add_ps)(e, splat(1.f));
  const F rc = rcp_estimate(d);
  return Vec(GK_MM(mul_ps)(GK_MM(mul_ps)(u, rc), GK_MM(fnmadd_ps)(d, rc, splat(2.f))));
#else
  return u / (Vec(1.f) + e);
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
  // *_from_exp: given e = exp_neg(u), for loops that compute e in a pass of their own
  static inline Vec f_from_exp(const Vec& u, const Vec& e) { return silu_from_exp(u, e); }
  static inline Vec df_from_exp(const Vec& u, const Vec& e) {
    const Vec s = sigmoid_from_exp(e);
    return s * (Vec(1.f) + u * (Vec(1.f) - s));
  }
  // always inlined: called, they were ~7% of a 32x256x7x7 forward (the last step of each group)
  static C10_ALWAYS_INLINE Vec f(const Vec& u) { return f_from_exp(u, exp_neg(u)); }
  static C10_ALWAYS_INLINE Vec df(const Vec& u) { return df_from_exp(u, exp_neg(u)); }
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
