"""The DDPM U-Net of Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020), appendix B.

ResBlocks of GroupNorm(32)+SiLU+conv with the timestep's sinusoidal embedding added after the first
conv, dropout before the second, self-attention at 16x16 resolution, skip connections between the
down and up paths. `fused=True` runs every GroupNorm+SiLU pair as one genkern kernel; `fused=False`
is the same network from eager torch.nn layers. Both builds have the same parameters and state_dict
keys, so weights move between them unchanged (and `genkern.patch` turns one into the other).

Optional class conditioning adds a label embedding to the time embedding; label `num_classes` is
the null label that classifier-free guidance trains with (Ho & Salimans 2022).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import genkern.nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    num_classes: int | None = None  # None: unconditional
    extra: dict = field(default_factory=dict)


CONFIGS = {
    # the paper's CIFAR-10 model: 35.7M parameters
    "cifar10": UNetConfig(),
    # a laptop-size model for the 16x16 handwritten digits (sklearn), class-conditional for CFG
    "digits": UNetConfig(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                         attn_resolutions=(8,), num_groups=8, num_classes=10),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in the DDPM code): [sin | cos]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class NormAct(nn.Module):
    """GroupNorm followed by SiLU: one fused genkern kernel, or the two eager layers. The parameters
    live in `.norm` either way (an nn.GroupNorm or its subclass genkern.nn.GroupNormSiLU)."""

    def __init__(self, num_groups: int, channels: int, fused: bool, act: bool = True):
        super().__init__()
        self.act = act
        if fused:
            self.norm = genkern.nn.GroupNormSiLU(num_groups, channels, activation="silu" if act else None)
        else:
            self.norm = nn.GroupNorm(num_groups, channels)
        self.fused = fused

    def forward(self, x):
        y = self.norm(x)
        return y if (self.fused or not self.act) else F.silu(y)

    def __genkern_patch__(self) -> bool:
        """genkern.patch: switch the eager pair to the fused layer, keeping the parameters."""
        if self.fused:
            return False
        self.norm = genkern.nn.GroupNormSiLU.from_group_norm(self.norm, "silu" if self.act else None)
        self.fused = True
        return True


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float, groups: int, fused: bool):
        super().__init__()
        self.norm1 = NormAct(groups, cin, fused)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = NormAct(groups, cout, fused)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with a GroupNorm (no activation) in front."""

    def __init__(self, ch: int, groups: int, fused: bool):
        super().__init__()
        self.norm = NormAct(groups, ch, fused, act=False)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """model(x, t[, class_labels]) -> predicted noise, x of shape [B, in_channels, S, S], t int [B]."""

    def __init__(self, config: UNetConfig | str = "cifar10", fused: bool = True, **overrides):
        super().__init__()
        cfg = CONFIGS[config] if isinstance(config, str) else config
        if overrides:
            cfg = UNetConfig(**{**cfg.__dict__, **overrides})
        self.config, self.fused = cfg, fused
        ch, groups, temb = cfg.ch, cfg.num_groups, 4 * cfg.ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        chans, cur, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb, cfg.dropout, groups, fused)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, groups, fused))
                self.down.append(nn.ModuleList(blocks))
                chans.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                chans.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, cfg.dropout, groups, fused), AttnBlock(cur, groups, fused),
                                  ResBlock(cur, cur, temb, cfg.dropout, groups, fused)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + chans.pop(), ch * mult, temb, cfg.dropout, groups, fused)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(cur, groups, fused))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.norm_out = NormAct(groups, cur, fused)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes

    def forward(self, x, t, class_labels=None):
        temb = self.temb(timestep_embedding(t, self.config.ch).to(x.dtype))
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.config.num_classes)
            temb = temb + self.label_emb(class_labels)
        hs = [self.conv_in(x)]
        for blocks in self.down:
            h = hs[-1]
            for m in blocks:
                h = m(h, temb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        h = hs[-1]
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for m in blocks:
                h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(self.norm_out(h))
