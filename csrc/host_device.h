// GENKERN_HD marks functions compiled for both host and device (CUDA), plain inline elsewhere.
#pragma once

#if defined(__CUDACC__)
#define GENKERN_HD __host__ __device__ __forceinline__
#else
#define GENKERN_HD inline
#endif

// Full unrolling of a short fixed loop, spelled as each compiler wants it.
#if defined(__CUDACC__)
#define GENKERN_UNROLL _Pragma("unroll")
#else
#define GENKERN_UNROLL _Pragma("GCC unroll 16")
#endif
