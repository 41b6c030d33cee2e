"""Drop-in GAN layers: PixelNorm and MinibatchStdDev (no parameters, so any state_dict loads)."""
from __future__ import annotations

from torch import nn

from ..ops.minibatch_stddev import minibatch_stddev
from ..ops.pixel_norm import pixel_norm


class PixelNorm(nn.Module):
    """``x / sqrt(mean(x**2, dim=1, keepdim=True) + eps)`` (ProGAN/StyleGAN), fused: genkern.pixel_norm."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return pixel_norm(x, self.eps)

    def extra_repr(self):
        return f"eps={self.eps}"


class MinibatchStdDev(nn.Module):
    """StyleGAN2's minibatch standard deviation layer (``MinibatchStdLayer``), fused: x [N, C, H, W] ->
    [N, C + num_channels, H, W]; see genkern.minibatch_stddev."""

    def __init__(self, group_size: int = 4, num_channels: int = 1, eps: float = 1e-8):
        super().__init__()
        self.group_size, self.num_channels, self.eps = group_size, num_channels, eps

    def forward(self, x):
        return minibatch_stddev(x, self.group_size, self.num_channels, self.eps)

    def extra_repr(self):
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
