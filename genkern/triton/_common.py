"""Pieces shared by the Triton kernels: the fused activations and launch-size helpers."""
import triton
import triton.language as tl

ACTIVATION_CODES = {"none": 0, "silu": 1, "gelu": 2}


@triton.jit
def activation(u, ACT: tl.constexpr):
    """act(u) for ACT = 0 (identity), 1 (SiLU), 2 (GELU, exact erf form)."""
    if ACT == 1:
        return u * tl.sigmoid(u)
    elif ACT == 2:
        return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    else:
        return u


@triton.jit
def activation_grad(u, ACT: tl.constexpr):
    """d act / du, as in csrc/activation.h."""
    if ACT == 1:
        s = tl.sigmoid(u)
        return s * (1.0 + u * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        return cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    else:
        return tl.full(u.shape, 1.0, tl.float32)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
