"""Reference minibatch standard deviation, StyleGAN2's semantics exactly (Karras et al., "Analyzing and
Improving the Image Quality of StyleGAN", CVPR 2020; first in ProGAN, ICLR 2018, sec. 3):

    G = min(group_size, N), F = num_channels, c = C // F
    y = x.reshape(G, N/G, F, c, H, W)        sample i sits in group slot i // (N/G), column i % (N/G)
    s = sqrt(mean_G((y - mean_G y)^2) + eps)  biased std over the group, eps inside the sqrt
    s = mean over (c, H, W)                   -> [N/G, F]
    out = cat([x, s broadcast to every sample of its column and every pixel], dim=1)   [N, C+F, H, W]
"""
from __future__ import annotations

import torch


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1, eps: float = 1e-8) -> torch.Tensor:
    N, C, H, W = x.shape
    G = min(group_size, N)
    F = num_channels
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xc.reshape(G, -1, F, C // F, H, W)
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + eps).sqrt()        # [N/G, F, c, H, W]
    s = y.mean(dim=(2, 3, 4)).reshape(-1, F, 1, 1)   # [N/G, F, 1, 1]
    s = s.repeat(G, 1, H, W)                         # [N, F, H, W]
    out = torch.cat([xc, s], dim=1)
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) \
        else torch.contiguous_format
    return out.to(dtype=x.dtype, memory_format=fmt)
