"""Drop-in modules for the fused ops (state_dict-compatible with the eager layers they replace)."""
from .gan import MinibatchStdDev, PixelNorm
from .group_norm_silu import GroupNormSiLU

__all__ = ["GroupNormSiLU", "MinibatchStdDev", "PixelNorm"]
