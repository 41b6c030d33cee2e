// The native registers of the ISA the CPU kernels are built for (setup.py: GENKERN_CPU_ISA), for the
// few loops written in intrinsics: the exponential behind SiLU (vec.h; its range reduction here),
// Philox (philox.h) and Box-Muller (cpu/ddpm_step.cpp). Their maths is written once on these names and
// compiles to 16 lanes (AVX-512) or 8 (AVX2), the width of at::vec::Vectorized<float> in the same
// build, which the rest of the code uses. GK_MM(op) is the intrinsic _mm512_op or _mm256_op, for the operations whose names
// only differ in that prefix; the functions below cover those that differ more.
// GENKERN_SIMD is defined when one of the two is available; without it the callers fall back to
// at::vec and scalar code.
#pragma once
#include <cstdint>

#if (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)) && !defined(__CUDACC__)
#include <immintrin.h>
#define GENKERN_SIMD 1

namespace genkern::simd {

#if defined(CPU_CAPABILITY_AVX512)
#define GK_MM(op) _mm512_##op
using F = __m512;
using I = __m512i;
constexpr int kLanes = 16;

inline I as_int(F v) { return _mm512_castps_si512(v); }
inline F as_float(I v) { return _mm512_castsi512_ps(v); }
inline I bit_and(I a, I b) { return _mm512_and_si512(a, b); }
inline I bit_xor(I a, I b) { return _mm512_xor_si512(a, b); }
// 1/v to 2^-14 (AVX2's estimate: 1.5 * 2^-12); callers add one Newton step
inline F rcp_estimate(F v) { return _mm512_rcp14_ps(v); }
// lanes where q is odd take `odd`, the others `even`
inline F select_odd(I q, F odd, F even) {
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, _mm512_set1_epi32(1)), even, odd);
}
// the even 32-bit lanes of `even` and the odd ones of `odd`
inline I interleave_lanes(I even, I odd) { return _mm512_mask_blend_epi32(0xAAAA, even, odd); }
inline I lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// 1 in the lanes where the unsigned sum a + b wrapped (a + b < b), else 0
inline I carry_of(I sum, I b) { return _mm512_maskz_set1_epi32(_mm512_cmplt_epu32_mask(sum, b), 1); }
inline void stream(I* p, I v) { _mm512_stream_si512(p, v); }
// 2^t in two parts (vec.h: exp2_reduce, exp2_finish): exp2_split(t, f, n) gives t = n + f, clamped,
// with 2^f what kExp2Poly approximates; times_pow2(p, n) is p 2^n. AVX-512 takes n = floor(t): f =
// t - floor(t) in [0, 1] is one instruction (vreduceps) and vscalefps floors t itself, so t needs
// clamping only above (vscalefps underflows to 0; vreduceps of -inf is 0). That replaced a rounding
// (two uops on port 0), a subtraction and the lower clamp: Xeon, 2 threads, alternating runs,
// GroupNorm+SiLU 16x256x16x16 forward 0.243 -> 0.221 ms, 8x512x32x32 forward+backward 3.56 -> 3.36.
inline void exp2_split(F t, F& f, F& n) {
  n = _mm512_min_ps(t, _mm512_set1_ps(126.f));
  f = _mm512_reduce_ps(n, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
inline F times_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }
// 2^f on [0, 1], degree 5 with p(0) = 1, least maximum relative error (8e-8 exact, ~2e-7 in float32;
// the error of a fit to 2^f does not depend on where the unit interval lies)
constexpr float kExp2Poly[6] = {1.f, 6.931513118846504e-1f, 2.4016444917719398e-1f, 5.579991667675542e-2f,
                                9.01702531965032e-3f, 1.8671324339266764e-3f};
#else
#define GK_MM(op) _mm256_##op
using F = __m256;
using I = __m256i;
constexpr int kLanes = 8;

inline I as_int(F v) { return _mm256_castps_si256(v); }
inline F as_float(I v) { return _mm256_castsi256_ps(v); }
inline I bit_and(I a, I b) { return _mm256_and_si256(a, b); }
inline I bit_xor(I a, I b) { return _mm256_xor_si256(a, b); }
inline F rcp_estimate(F v) { return _mm256_rcp_ps(v); }
inline F select_odd(I q, F odd, F even) { return _mm256_blendv_ps(even, odd, as_float(_mm256_slli_epi32(q, 31))); }
inline I interleave_lanes(I even, I odd) { return _mm256_blend_epi32(even, odd, 0xAA); }
inline I lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline I carry_of(I sum, I b) {
  const I sign = _mm256_set1_epi32(INT32_MIN);  // unsigned compare by flipping the sign bits
  return _mm256_srli_epi32(_mm256_cmpgt_epi32(_mm256_xor_si256(b, sign), _mm256_xor_si256(sum, sign)), 31);
}
inline void stream(I* p, I v) { _mm256_stream_si256(p, v); }
// AVX2 takes n = round(t), f in [-1/2, 1/2], and adds n into the exponent bits (convert, shift,
// integer add), which needs t clamped on both sides so that 2^n stays a normal float
inline void exp2_split(F t, F& f, F& n) {
  const F v = _mm256_max_ps(_mm256_min_ps(t, _mm256_set1_ps(126.f)), _mm256_set1_ps(-126.f));
  const F r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  f = _mm256_sub_ps(v, r);
  n = as_float(_mm256_slli_epi32(_mm256_cvtps_epi32(r), 23));
}
inline F times_pow2(F p, F n_bits) { return as_float(_mm256_add_epi32(as_int(p), as_int(n_bits))); }
// 2^f on [-1/2, 1/2], degree 5 with p(0) = 1, least maximum relative error (7.5e-8 exact, ~2e-7 in
// float32)
constexpr float kExp2Poly[6] = {1.f, 6.931470036506653e-1f, 2.4022242426872253e-1f, 5.550733581185341e-2f,
                                9.671512991189957e-3f, 1.326472731307149e-3f};
#endif

inline F splat(float v) { return GK_MM(set1_ps)(v); }
inline I splat(uint32_t v) { return GK_MM(set1_epi32)(static_cast<int>(v)); }

}  // namespace genkern::simd
#endif
