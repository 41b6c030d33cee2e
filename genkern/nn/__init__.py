"""Drop-in modules for the fused ops (state_dict-compatible with the eager layers they replace)."""
from .group_norm_silu import GroupNormSiLU

__all__ = ["GroupNormSiLU"]
