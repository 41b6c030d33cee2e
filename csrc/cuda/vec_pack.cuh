// Packs of V elements read and written as one vector access (16 bytes or narrower) by the CUDA kernels.
#pragma once

namespace genkern::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) VecPack {
  T v[V];
};

// Elements of T in a 16-byte access, the widest a thread can load at once.
template <typename T>
constexpr int kPack16 = 16 / static_cast<int>(sizeof(T));

}  // namespace genkern::cuda
