"""genkern.patch(model): put the fused GroupNorm+SiLU kernel into a model written elsewhere, in place.

What is replaced (weights are kept: the fused layer shares the GroupNorm's parameters, and the
state_dict keys do not change):

* in any ``nn.Sequential``, an ``nn.GroupNorm`` directly followed by ``nn.SiLU`` (or exact
  ``nn.GELU``): the norm becomes ``genkern.nn.GroupNormSiLU`` and the activation ``nn.Identity``;
* diffusers' ``ResnetBlock2D`` with a SiLU nonlinearity and any ``time_embedding_norm`` but
  ``"scale_shift"`` (``"default"``, and the VAE decoders' ``"group"``, which has no time embedding):
  ``norm1`` and ``norm2`` become fused. Its single ``nonlinearity`` module is applied to the
  feature maps right after ``norm1`` and ``norm2`` *and* to the 2-D time embedding, so it cannot
  become an Identity: it is replaced by ``SiLUOnEmbedding``, SiLU for 2-D inputs (the embedding)
  and a pass-through for the feature maps, which the fused norms have already activated;
* the output head of diffusers' ``UNet2DModel``, ``UNet2DConditionModel`` and the ``Encoder``,
  ``Decoder`` and ``MaskConditionDecoder`` of its VAEs: ``conv_norm_out`` (an ``nn.GroupNorm``)
  becomes fused and ``conv_act`` (``nn.SiLU``) ``nn.Identity``. Their ``forward`` applies
  ``conv_act`` only right after ``conv_norm_out`` (checked in diffusers 0.42's source); other
  diffusers models with the same two attributes (video VAEs, 3-D U-Nets) are not checked and are
  listed as skipped;
* any module defining ``__genkern_patch__(self) -> bool`` (the package's own blocks, e.g.
  ``models.unet.NormAct``): it converts itself and says whether it changed.

Anything else is left alone; blocks that look patchable but are not (a scale-shift time
embedding, another activation) are listed in the report with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .nn import GroupNormSiLU

__all__ = ["patch", "PatchReport", "SiLUOnEmbedding"]


@dataclass
class PatchReport:
    """What `patch` did: `replaced` and `skipped` hold "qualified.module.name: detail" lines."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"genkern.patch: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {r}" for r in self.replaced]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


class SiLUOnEmbedding(nn.Module):
    """SiLU for 2-D inputs (a time embedding [B, C]); identity for feature maps (already activated
    by a fused GroupNormSiLU). Only `patch` installs it, in blocks it has checked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if x.dim() == 2 else x


def _activation_of(m: nn.Module) -> str | None:
    if type(m) is nn.SiLU:
        return "silu"
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    return None


def _plain_group_norm(m: nn.Module) -> bool:
    return type(m) is nn.GroupNorm  # not a subclass: it may already be fused or compute something else


def _patch_sequential(name: str, seq: nn.Sequential, report: PatchReport) -> None:
    keys = list(seq._modules.keys())
    for a, b in zip(keys, keys[1:]):
        norm, act = seq._modules[a], seq._modules[b]
        if norm is None or act is None or not _plain_group_norm(norm):
            continue
        kind = _activation_of(act)
        if kind is None:
            continue
        seq._modules[a] = GroupNormSiLU.from_group_norm(norm, kind)
        seq._modules[b] = nn.Identity()
        report.replaced.append(f"{name or '<root>'}.{a}+{b}: GroupNorm -> {kind} fused")


def _from_diffusers(m: nn.Module) -> bool:
    return type(m).__module__.startswith("diffusers.")


def _is_diffusers_resnet(m: nn.Module) -> bool:
    return type(m).__name__ == "ResnetBlock2D" and _from_diffusers(m)


def _patch_diffusers_resnet(name: str, block: nn.Module, report: PatchReport) -> None:
    if not (_plain_group_norm(block.norm1) and _plain_group_norm(block.norm2)):
        report.skipped.append(f"{name}: ResnetBlock2D norms are not nn.GroupNorm")
        return
    # Every other value with plain GroupNorms runs norm2 straight into the nonlinearity: "default" (the time
    # embedding is added before norm2) and the VAE decoders' "group" (no time embedding at all).
    if block.time_embedding_norm == "scale_shift":
        report.skipped.append(f"{name}: ResnetBlock2D time_embedding_norm={block.time_embedding_norm!r} puts the "
                              "time scale/shift between norm2 and the activation")
        return
    if type(block.nonlinearity) is not nn.SiLU:
        report.skipped.append(f"{name}: ResnetBlock2D nonlinearity is {type(block.nonlinearity).__name__}, not SiLU")
        return
    block.norm1 = GroupNormSiLU.from_group_norm(block.norm1, "silu")
    block.norm2 = GroupNormSiLU.from_group_norm(block.norm2, "silu")
    block.nonlinearity = SiLUOnEmbedding()
    report.replaced.append(f"{name}: ResnetBlock2D norm1, norm2 -> GroupNorm+SiLU fused")


# diffusers classes whose forward is `conv_act(conv_norm_out(h))` and uses conv_act nowhere else
_DIFFUSERS_NORM_OUT = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder", "MaskConditionDecoder")


def _has_diffusers_norm_out(m: nn.Module) -> bool:
    return _from_diffusers(m) and isinstance(getattr(m, "conv_norm_out", None), nn.Module) and \
        isinstance(getattr(m, "conv_act", None), nn.Module)


def _patch_diffusers_norm_out(name: str, m: nn.Module, report: PatchReport) -> None:
    cls = type(m).__name__
    if cls not in _DIFFUSERS_NORM_OUT:
        report.skipped.append(f"{name or '<root>'}: {cls}.conv_norm_out + conv_act: a diffusers class whose forward "
                              "genkern has not checked")
        return
    if not _plain_group_norm(m.conv_norm_out):  # e.g. the Decoder's SpatialNorm (MoVQ)
        report.skipped.append(f"{name or '<root>'}: {cls}.conv_norm_out is {type(m.conv_norm_out).__name__}, "
                              "not nn.GroupNorm")
        return
    kind = _activation_of(m.conv_act)
    if kind is None:
        report.skipped.append(f"{name or '<root>'}: {cls}.conv_act is {type(m.conv_act).__name__}, not SiLU or GELU")
        return
    m.conv_norm_out = GroupNormSiLU.from_group_norm(m.conv_norm_out, kind)
    m.conv_act = nn.Identity()
    report.replaced.append(f"{name or '<root>'}: {cls}.conv_norm_out+conv_act -> GroupNorm+{kind} fused")


def patch(model: nn.Module) -> PatchReport:
    """Replace GroupNorm -> SiLU pairs of `model` by the fused layer, in place; returns a report.

    Outputs are unchanged up to the fused kernel's rounding (fp32 accumulation), and gradients flow
    to the same parameters (the same objects, so an optimizer built earlier keeps working). Patch
    before `torch.compile`-ing the model.
    """
    report = PatchReport()
    for name, m in list(model.named_modules()):
        hook = getattr(m, "__genkern_patch__", None)
        if callable(hook):
            if hook():
                report.replaced.append(f"{name or '<root>'}: {type(m).__name__} fused")
        elif isinstance(m, nn.Sequential):
            _patch_sequential(name, m, report)
        elif _is_diffusers_resnet(m):
            _patch_diffusers_resnet(name, m, report)
        if _has_diffusers_norm_out(m):
            _patch_diffusers_norm_out(name, m, report)
    return report
