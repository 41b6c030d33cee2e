from __future__ import annotations

import torch
from torch import nn

from ..ops.group_norm_silu import _activation_name, group_norm_silu


class GroupNormSiLU(nn.GroupNorm):
    """``nn.GroupNorm`` followed by ``nn.SiLU`` (or GELU, or nothing) in one fused kernel.

    Same constructor and state_dict keys (``weight``, ``bias``) as ``torch.nn.GroupNorm``, so weights
    of ``nn.Sequential(nn.GroupNorm(32, C), nn.SiLU())``'s first module load unchanged::

        norm = genkern.nn.GroupNormSiLU(32, 256)
        norm.load_state_dict(old_groupnorm.state_dict())
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, activation: str | None = "silu"):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = _activation_name(activation)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: str | None = "silu") -> "GroupNormSiLU":
        """The fused layer sharing `gn`'s parameters (no copy)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.num_groups, m.num_channels, m.eps, m.affine = gn.num_groups, gn.num_channels, gn.eps, gn.affine
        m.weight, m.bias = gn.weight, gn.bias
        m.activation = _activation_name(activation)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"
