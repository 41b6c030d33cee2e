// Activations fused after a normalisation, shared by the CPU (scalar tails) and CUDA kernels.
// act'(u) is what the backward passes need: they recompute u from x and the saved statistics.
#pragma once
#include <cmath>
#include <string>
#include <type_traits>

#include <c10/util/Exception.h>

#include "host_device.h"

namespace genkern {

enum class Activation : int { None = 0, SiLU = 1, GeLU = 2 };

inline Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::SiLU;
  if (name == "gelu") return Activation::GeLU;
  if (name == "none") return Activation::None;
  TORCH_CHECK_VALUE(false, "activation must be \"silu\", \"gelu\" or \"none\", got \"", name, "\"");
}

template <Activation A>
struct Act;

template <>
struct Act<Activation::None> {
  static GENKERN_HD float f(float u) { return u; }
  static GENKERN_HD float df(float) { return 1.f; }
};

// SiLU (Elfwing et al. 2018; "swish"): u * sigmoid(u); d/du = s * (1 + u * (1 - s)).
template <>
struct Act<Activation::SiLU> {
  static GENKERN_HD float sigmoid(float u) {
#ifdef __CUDA_ARCH__
    // MUFU exp and reciprocal (2 ulp): the IEEE division and expf made GroupNorm+SiLU compute-bound
    // in bf16 on an H100. For u < -87, 1 + e^-u overflows and __fdividef gives 0, the right limit.
    return __fdividef(1.f, 1.f + __expf(-u));
#else
    return 1.f / (1.f + expf(-u));
#endif
  }
  static GENKERN_HD float f(float u) { return u * sigmoid(u); }
  static GENKERN_HD float df(float u) {
    const float s = sigmoid(u);
    return s * (1.f + u * (1.f - s));
  }
};

// GELU, exact erf form (Hendrycks & Gimpel 2016), as torch.nn.GELU(approximate="none"):
// u * Phi(u); d/du = Phi(u) + u * phi(u).
template <>
struct Act<Activation::GeLU> {
  static GENKERN_HD float f(float u) { return 0.5f * u * (1.f + erff(u * 0.70710678118654752f)); }
  static GENKERN_HD float df(float u) {
    const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * u * u);
    return cdf + u * pdf;
  }
};

template <Activation A>
using ActivationConstant = std::integral_constant<Activation, A>;

// Calls fn(ActivationConstant<A>{}) so that the kernel sees the activation as a compile-time
// constant: `[&](auto act) { constexpr Activation A = decltype(act)::value; ... }`.
template <typename Fn>
inline void dispatch_activation(Activation a, Fn&& fn) {
  switch (a) {
    case Activation::None: return fn(ActivationConstant<Activation::None>{});
    case Activation::SiLU: return fn(ActivationConstant<Activation::SiLU>{});
    case Activation::GeLU: return fn(ActivationConstant<Activation::GeLU>{});
  }
}

}  // namespace genkern
