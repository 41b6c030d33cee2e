"""Philox4x32-10 + Box-Muller in plain PyTorch: the readable definition of genkern's in-kernel noise.

Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011) for Philox;
Box & Muller (1958) for the normals. The fast copies are csrc/philox.h (CPU and CUDA) and
genkern/triton/_common.py (Triton); all three give the same numbers for the same (seed, offset):

    element i (its offset in memory order, the order torch.randn_like fills) is lane i % 4 of group
    g = i // 4:   r = Philox4x32-10(counter=(lo(g), hi(g), lo(offset), hi(offset)), key=(lo(seed), hi(seed)))
    u_k = (r_k >> 9) * 2^-23 + 2^-24                        exact in float32, strictly inside (0, 1)
    (z_0, z_1) = sqrt(-2 log u_0) * (cos 2 pi u_1, sin 2 pi u_1),  (z_2, z_3) likewise from (u_2, u_3)

uint32 arithmetic is emulated in int64 (a 32x32-bit product is split in 16-bit halves so nothing
overflows), so this runs on any device and dtype PyTorch has.
"""
from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57   # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85   # Weyl key increments
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64."""
    lo_part = a * (m & 0xFFFF)            # < 2^48
    hi_part = a * (m >> 16)               # < 2^48
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    hi = ((hi_part + (lo_part >> 16)) >> 16) & _MASK32
    return hi, lo


def philox4x32_10(c: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Ten Philox4x32 rounds of counters c = [c0, c1, c2, c3] (uint32 values in int64 tensors)."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return [c0, c1, c2, c3]


def philox_uniform(numel: int, seed: int, offset: int, device=None, start: int = 0) -> torch.Tensor:
    """The float32 uniforms u_start .. u_{start+numel-1} of the stream (seed, offset), in element order."""
    seed, offset = seed & (2**64 - 1), offset & (2**64 - 1)
    g = torch.arange(start // 4, (start + numel + 3) // 4, dtype=torch.int64, device=device)
    counters = [g & _MASK32, g >> 32, torch.full_like(g, offset & _MASK32), torch.full_like(g, offset >> 32)]
    r = torch.stack(philox4x32_10(counters, (seed & _MASK32, seed >> 32)), dim=1).reshape(-1)
    r = r[start % 4:start % 4 + numel]
    return (r >> 9).to(torch.float32) * 2.0**-23 + 2.0**-24


def philox_normal(shape, seed: int, offset: int = 0, *, dtype=torch.float32, device=None,
                  strides=None, start: int = 0) -> torch.Tensor:
    """Standard normals of the stream (seed, offset) as a tensor of `shape` (and dense `strides`,
    default contiguous) whose memory, in order, holds elements start, start + 1, ... of the stream
    (start > 0: a slice of a larger tensor's noise, e.g. its last sample): a channels_last result
    differs from an NCHW one element-wise, exactly as with torch.randn_like.
    Box-Muller runs in float64, then rounds to dtype."""
    shape = tuple(shape)
    numel = math.prod(shape)
    first = start - start % 2  # Box-Muller pairs elements (2k, 2k + 1)
    count = numel + start - first
    u = philox_uniform(count + count % 2, seed, offset, device, start=first).double().reshape(-1, 2)
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    theta = 2.0 * math.pi * u[:, 1]
    z = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=1).reshape(-1)
    z = z[start - first:start - first + numel]
    out = (torch.empty(shape, dtype=dtype, device=device) if strides is None
           else torch.empty_strided(shape, strides, dtype=dtype, device=device))
    # Fill memory in order, whatever the strides: write through the dense permutation of out.
    order = sorted(range(len(shape)), key=lambda d: -out.stride(d))
    out.permute(order).copy_(z.to(dtype).reshape([shape[d] for d in order]))
    return out
