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

#if defined(__CUDACC__)
#define GENKERN_HD __host__ __device__ __forceinline__
#else
#define GENKERN_HD inline
#endif

namespace genkern {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Ten rounds of Philox4x32 on counter c with key (k0, k1); the result replaces c.
GENKERN_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#pragma unroll
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
#pragma unroll
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

}  // namespace genkern
