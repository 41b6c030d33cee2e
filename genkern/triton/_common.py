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


# Philox4x32-10 + Box-Muller: the stream of csrc/philox.h (definition: genkern/reference/philox.py).
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_uniform(r):
    return (r >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08


@triton.jit
def philox_normal4(seed_lo, seed_hi, offset_lo, offset_hi, g):
    """The four normals of Philox groups g (an int64 block): elements 4g .. 4g+3 of the stream."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    # scalars arrive as i32 or i64 (or constexpr 1) depending on their value: widen, then truncate
    c2 = (tl.zeros_like(c0) + offset_lo).to(tl.uint32)
    c3 = (tl.zeros_like(c0) + offset_hi).to(tl.uint32)
    k0 = (tl.zeros_like(c0) + seed_lo).to(tl.uint32)
    k1 = (tl.zeros_like(c0) + seed_hi).to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(c2, _PHILOX_M1) ^ c1 ^ k0
        n2 = tl.umulhi(c0, _PHILOX_M0) ^ c3 ^ k1
        c1 = c2 * _PHILOX_M1
        c3 = c0 * _PHILOX_M0
        c0 = n0
        c2 = n2
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    r01 = tl.sqrt(-2.0 * tl.log(_philox_uniform(c0)))
    t01 = 6.283185307179586 * _philox_uniform(c1)
    r23 = tl.sqrt(-2.0 * tl.log(_philox_uniform(c2)))
    t23 = 6.283185307179586 * _philox_uniform(c3)
    return r01 * tl.cos(t01), r01 * tl.sin(t01), r23 * tl.cos(t23), r23 * tl.sin(t23)


def split_u64(v: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of v taken modulo 2^64, for kernel arguments."""
    v &= 2**64 - 1
    return v & 0xFFFFFFFF, v >> 32
