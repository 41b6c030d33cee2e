"""Memory-layout facts shared by the Python side (fake kernels, Triton host code)."""
import torch


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """x is dense with the channels innermost, (N, *spatial, C) in memory, and not plain contiguous
    (the same test as is_channels_last_dense in csrc/group_norm_silu.h)."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    return x.permute([0] + list(range(2, x.dim())) + [1]).is_contiguous()
