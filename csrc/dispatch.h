// Dtype dispatch shared by the CPU and CUDA kernels: float32 storage, plus the two 16-bit types
// (computed in float32). float64 is not a kernel dtype; the reference backend handles it.
#pragma once
#include <ATen/Dispatch.h>

#define GENKERN_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// A value that carries a type, for the generic lambdas that dispatch hands the element type to
// (`using T = typename decltype(tag)::type;`). std::type_identity would do, but it is C++20, and
// torch before 2.13 compiles extensions' CUDA sources as C++17 (the GPU machine has torch 2.11).
template <typename T>
struct TypeTag {
  using type = T;
};
