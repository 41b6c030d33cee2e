"""Memory-layout facts shared by the Python side (fake kernels, Triton host code)."""
import torch


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """x is dense with the channels innermost, (N, *spatial, C) in memory, and not plain contiguous
    (the same test as is_channels_last_dense in csrc/group_norm_silu.h)."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    return x.permute([0] + list(range(2, x.dim())) + [1]).is_contiguous()


def _is_dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel consecutive slots in some dim order."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def elementwise_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides the elementwise kernels (ddpm_step, add_noise, gradient_penalty) walk: x's own when x is dense with the
    batch dim outermost (contiguous, channels_last, ...), else contiguous. Mirrors
    elementwise_strides in csrc/layout.h; element i of this memory order draws noise element i."""
    batch_outer = x.dim() == 0 or x.shape[0] <= 1 or x.stride(0) * x.shape[0] == x.numel()
    if _is_dense(x) and batch_outer:
        return tuple(x.stride())
    return torch.empty(x.shape, device="meta").stride()


def to_strides(t: torch.Tensor, strides) -> torch.Tensor:
    """t itself when it already has `strides`, else a copy with them."""
    if tuple(t.stride()) == tuple(strides):
        return t
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out
