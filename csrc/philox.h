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
#if !defined(__CUDACC__)
#include "cpu/simd.h"
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
    // --use_fast_math turns logf into __logf, whose absolute error would move small radii; log1pf is
    // left alone, and u - 1 is exact (u is an odd multiple of 2^-24). Over all 2^23 values of u the
    // radius is within 1.8 x 2^-24 relative of the exact one (with a float64 log, as before: 1.5). The
    // float64 log ran at half the float32 rate on the H100, where the step took ~0.07 ms in bf16 and fp32
    // alike (compute-bound in bf16).
    const float radius = sqrtf(-2.0f * log1pf(u[k] - 1.0f));
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

#if defined(GENKERN_SIMD)
// philox_uniform4 on the CPU's vectors (cpu/simd.h: kLanes = 16 or 8 lanes), one group per lane.
// The 32x32 -> 64-bit products come from vpmuludq on the even and the odd lanes separately.
// The ten round keys of a seed, broadcast once per block rather than once per round.
struct PhiloxKeysV {
  simd::I k0[10], k1[10];
  explicit PhiloxKeysV(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
      k0[r] = simd::splat(a);
      k1[r] = simd::splat(b);
    }
  }
};

// One Philox round on every lane.
inline void philox_round_v(simd::I& c0, simd::I& c1, simd::I& c2, simd::I& c3, simd::I k0, simd::I k1) {
  using namespace simd;
  const I m0 = splat(kPhiloxM0), m1 = splat(kPhiloxM1);
  const I p0e = GK_MM(mul_epu32)(c0, m0), p0o = GK_MM(mul_epu32)(GK_MM(srli_epi64)(c0, 32), m0);
  const I p1e = GK_MM(mul_epu32)(c2, m1), p1o = GK_MM(mul_epu32)(GK_MM(srli_epi64)(c2, 32), m1);
  const I hi0 = interleave_lanes(GK_MM(srli_epi64)(p0e, 32), p0o);
  const I lo0 = interleave_lanes(p0e, GK_MM(slli_epi64)(p0o, 32));
  const I hi1 = interleave_lanes(GK_MM(srli_epi64)(p1e, 32), p1o);
  const I lo1 = interleave_lanes(p1e, GK_MM(slli_epi64)(p1o, 32));
  c0 = bit_xor(bit_xor(hi1, c1), k0);
  c2 = bit_xor(bit_xor(hi0, c3), k1);
  c1 = lo1;
  c3 = lo0;
}

// Counter words (lo(g), hi(g)) of the kLanes groups g0 .. g0 + kLanes - 1; the low word may wrap once.
inline void philox_counters_v(uint64_t g0, simd::I& c0, simd::I& c1) {
  using namespace simd;
  const I vlo = splat(static_cast<uint32_t>(g0));
  c0 = GK_MM(add_epi32)(vlo, lane_index());
  c1 = GK_MM(add_epi32)(splat(static_cast<uint32_t>(g0 >> 32)), carry_of(c0, vlo));
}

inline simd::F philox_uniform_v(simd::I r) {
  using namespace simd;
  return GK_MM(fmadd_ps)(GK_MM(cvtepi32_ps)(GK_MM(srli_epi32)(r, 9)), splat(1.1920928955078125e-07f),
                         splat(5.9604644775390625e-08f));
}

// philox_uniform4 for the 2 kLanes groups g0 .. g0 + 2 kLanes - 1: u[k] / u[4 + k] hold lane k of
// the first / the second kLanes groups. Two independent chains interleaved, so that the
// multiplier's latency is hidden behind the other chain.
inline void philox_uniform4_2v(const PhiloxKeysV& keys, uint64_t offset, uint64_t g0, simd::F u[8]) {
  using namespace simd;
  I a0, a1, b0, b1;
  philox_counters_v(g0, a0, a1);
  philox_counters_v(g0 + kLanes, b0, b1);
  const I o_lo = splat(static_cast<uint32_t>(offset)), o_hi = splat(static_cast<uint32_t>(offset >> 32));
  I a2 = o_lo, a3 = o_hi, b2 = o_lo, b3 = o_hi;
  for (int round = 0; round < 10; ++round) {
    philox_round_v(a0, a1, a2, a3, keys.k0[round], keys.k1[round]);
    philox_round_v(b0, b1, b2, b3, keys.k0[round], keys.k1[round]);
  }
  u[0] = philox_uniform_v(a0), u[1] = philox_uniform_v(a1), u[2] = philox_uniform_v(a2), u[3] = philox_uniform_v(a3);
  u[4] = philox_uniform_v(b0), u[5] = philox_uniform_v(b1), u[6] = philox_uniform_v(b2), u[7] = philox_uniform_v(b3);
}
#endif

}  // namespace genkern
