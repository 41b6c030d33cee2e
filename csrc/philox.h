// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the
// Box-Muller transform: the counter-based normal generator behind genkern's in-kernel noise.
// One definition for host (CPU kernels) and device (CUDA kernels); the Triton copy is
// genkern/triton/_common.py::philox_normal4 and the readable one genkern/reference/philox.py.
//
// The stream, fixed so that every backend draws the same numbers for the same (seed, offset):
//   element i of a tensor (its offset in memory order, as torch.randn_like fills) belongs to group
//   g = i / 4 and takes lane i % 4 of
//     r = Philox4x32-10(counter = (lo(g), hi(g), lo(offset), hi(offset)), key = (lo(seed), hi(seed)))
//   u_k = (r_k >> 9) * 2^-23 + 2^-24            exact in float32, in (0, 1): log(u) is finite
//   z_0, z_1 = sqrt(-2 log u_0) * (cos, sin)(2 pi u_1),   z_2, z_3 the same from u_2, u_3
// (|z| <= 5.77: the 2^-24 floor of u truncates the normal beyond 5.77 sigma, probability 8e-9.)
#pragma once
#include <cmath>
#include <cstdint>
#if defined(CPU_CAPABILITY_AVX2) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#include "host_device.h"

namespace genkern {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Ten rounds of Philox4x32 on counter c with key (k0, k1); the result replaces c.
GENKERN_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
GENKERN_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The (0, 1) uniform of one 32-bit draw: 23 random bits, centred in their bin.
GENKERN_HD float philox_uniform(uint32_t r) {
  return static_cast<float>(r >> 9) * 1.1920928955078125e-07f + 5.9604644775390625e-08f;
}

// The four uniforms of group g of the stream (seed, offset), before Box-Muller.
GENKERN_HD void philox_uniform4(uint64_t seed, uint64_t offset, uint64_t g, float u[4]) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  u[0] = philox_uniform(c0);
  u[1] = philox_uniform(c1);
  u[2] = philox_uniform(c2);
  u[3] = philox_uniform(c3);
}

// The four standard normals of group g (elements 4g .. 4g+3) of the stream (seed, offset).
GENKERN_HD void philox_normal4(uint64_t seed, uint64_t offset, uint64_t g, float z[4]) {
  float u[4];
  philox_uniform4(seed, offset, g, u);
GENKERN_UNROLL
  for (int k = 0; k < 4; k += 2) {
    float s, c;
#if defined(__CUDA_ARCH__)
    // double log: --use_fast_math turns logf into __logf, whose absolute error would move small radii
    const float radius = sqrtf(static_cast<float>(-2.0 * log(static_cast<double>(u[k]))));
    sincospif(2.0f * u[k + 1], &s, &c);  // exact argument reduction, unaffected by --use_fast_math
#else
    const float radius = std::sqrt(-2.0f * std::log(u[k]));
    const float theta = 6.283185307179586f * u[k + 1];
    s = std::sin(theta);
    c = std::cos(theta);
#endif
    z[k] = radius * c;
    z[k + 1] = radius * s;
  }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(__CUDACC__)
// philox_uniform4 for 8 consecutive groups g0 .. g0+7 at once (AVX2): u[k] holds lane k of each.
// The 32x32 -> 64-bit products come from vpmuludq on the even and the odd lanes separately.
// The ten round keys of a seed, broadcast once per block rather than once per round.
struct PhiloxKeysX8 {
  __m256i k0[10], k1[10];
  explicit PhiloxKeysX8(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
    }
  }
};

// One Philox round on 8 lanes.
inline void philox_round_x8(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
  const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
  const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
  const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
  const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
  c1 = lo1;
  c3 = lo0;
}

// Counter words (lo(g), hi(g)) of the 8 groups g0 .. g0+7; the low word may wrap once.
inline void philox_counters_x8(uint64_t g0, __m256i& c0, __m256i& c1) {
  const uint32_t lo = static_cast<uint32_t>(g0), hi = static_cast<uint32_t>(g0 >> 32);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN), vlo = _mm256_set1_epi32(static_cast<int>(lo));
  c0 = _mm256_add_epi32(vlo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(vlo, sign), _mm256_xor_si256(c0, sign));  // -1
  c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi)), wrapped);
}

inline __m256 philox_uniform_x8(__m256i r) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 9)), _mm256_set1_ps(1.1920928955078125e-07f),
                         _mm256_set1_ps(5.9604644775390625e-08f));
}

// philox_uniform4 for the 16 groups g0 .. g0+15 (AVX2): u[k] / u[4 + k] hold lane k of groups
// g0 .. g0+7 / g0+8 .. g0+15. Two independent 8-lane chains interleaved, so that the multiplier's
// latency is hidden behind the other chain.
inline void philox_uniform4_x16(const PhiloxKeysX8& keys, uint64_t offset, uint64_t g0, __m256 u[8]) {
  __m256i a0, a1, b0, b1;
  philox_counters_x8(g0, a0, a1);
  philox_counters_x8(g0 + 8, b0, b1);
  const __m256i o_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i o_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  __m256i a2 = o_lo, a3 = o_hi, b2 = o_lo, b3 = o_hi;
  for (int round = 0; round < 10; ++round) {
    philox_round_x8(a0, a1, a2, a3, keys.k0[round], keys.k1[round]);
    philox_round_x8(b0, b1, b2, b3, keys.k0[round], keys.k1[round]);
  }
  u[0] = philox_uniform_x8(a0), u[1] = philox_uniform_x8(a1), u[2] = philox_uniform_x8(a2), u[3] = philox_uniform_x8(a3);
  u[4] = philox_uniform_x8(b0), u[5] = philox_uniform_x8(b1), u[6] = philox_uniform_x8(b2), u[7] = philox_uniform_x8(b3);
}
#endif

}  // namespace genkern
