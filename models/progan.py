"""ProGAN (Karras et al., "Progressive Growing of GANs", 2018) trained with WGAN-GP.

Generator: z -> pixel norm -> 4x4 block, then per doubling: nearest upsample, two 3x3 convs, each
followed by LeakyReLU(0.2) and pixel norm; a 1x1 toRGB per resolution. Discriminator: the mirror
image with a 1x1 fromRGB per resolution, average-pool downsampling, and minibatch stddev before its
last (4x4) block. All layers use the equalized learning rate. Training grows from 4x4 to the target
resolution; each new resolution fades in over `fade` steps: the networks blend the new block's
output with the upsampled (G) / downsampled (D) output of the previous one by alpha 0 -> 1.

Loss (sec. A.1): WGAN-GP with lambda = 10 and the drift term eps_drift * E[D(x)^2], eps = 0.001.
`fused=True` uses genkern's pixel norm, minibatch stddev and gradient penalty; `fused=False` the
eager versions of the same (models/layers.py); the weights are the same either way.

    python -m models.progan train --steps 3000 --out runs/progan-digits
    python -m models.progan sample --ckpt runs/progan-digits/ckpt.pt --out progan.png
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import genkern

from . import data, quality
from .common import (TrainRun, add_evaluate_args, add_sample_args, add_train_args, load_checkpoint, report_quality,
                     run_cli, save_grid)
from .layers import EqualizedConv2d, EqualizedLinear, eager_gradient_penalty, minibatch_stddev, pixel_norm, slerp_strip

CONFIGS = {
    # channels per resolution, from 4x4 up
    "digits": {"image_size": 16, "in_channels": 1, "latent": 64, "channels": (64, 64, 32)},
    "cifar10": {"image_size": 32, "in_channels": 3, "latent": 256, "channels": (256, 256, 128, 64)},
}


def lrelu(x):
    return F.leaky_relu(x, 0.2)


class Generator(nn.Module):
    def __init__(self, config: str = "digits", fused: bool = True):
        super().__init__()
        c = CONFIGS[config]
        ch, self.latent = c["channels"], c["latent"]
        self.pn = pixel_norm(fused)
        self.fc = EqualizedLinear(self.latent, ch[0] * 16, gain=2 ** 0.5 / 4)  # ProGAN: gain sqrt(2)/4 here
        self.conv0 = EqualizedConv2d(ch[0], ch[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([EqualizedConv2d(ch[i - 1], ch[i], 3, padding=1), EqualizedConv2d(ch[i], ch[i], 3, padding=1)])
            for i in range(1, len(ch)))
        self.to_rgb = nn.ModuleList(EqualizedConv2d(cc, c["in_channels"], 1, gain=1.0) for cc in ch)

    @property
    def num_stages(self) -> int:
        return len(self.to_rgb)

    def forward(self, z: torch.Tensor, stage: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Images at resolution 4 * 2**stage (default: the full size), fading the last block in by alpha."""
        stage = self.num_stages - 1 if stage is None else stage
        h = self.pn(lrelu(self.fc(self.pn(z)).reshape(z.shape[0], -1, 4, 4)))
        h = self.pn(lrelu(self.conv0(h)))
        prev = None
        for i in range(stage):
            prev = h
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            for conv in self.blocks[i]:
                h = self.pn(lrelu(conv(h)))
        out = self.to_rgb[stage](h)
        if prev is not None and alpha < 1.0:
            skip = F.interpolate(self.to_rgb[stage - 1](prev), scale_factor=2, mode="nearest")
            out = torch.lerp(skip, out, alpha)
        return out


class Discriminator(nn.Module):
    def __init__(self, config: str = "digits", fused: bool = True):
        super().__init__()
        c = CONFIGS[config]
        ch = c["channels"]
        self.from_rgb = nn.ModuleList(EqualizedConv2d(c["in_channels"], cc, 1) for cc in ch)
        # blocks[i] takes resolution 4 * 2**(i+1) down to 4 * 2**i
        self.blocks = nn.ModuleList(
            nn.ModuleList([EqualizedConv2d(ch[i], ch[i], 3, padding=1), EqualizedConv2d(ch[i], ch[i - 1], 3, padding=1)])
            for i in range(1, len(ch)))
        self.mbstd = minibatch_stddev(fused)
        self.conv_last = EqualizedConv2d(ch[0] + 1, ch[0], 3, padding=1)
        self.conv_4x4 = EqualizedConv2d(ch[0], ch[0], 4)
        self.fc = EqualizedLinear(ch[0], 1, gain=1.0)

    def forward(self, x: torch.Tensor, stage: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        stage = len(self.from_rgb) - 1 if stage is None else stage
        h = lrelu(self.from_rgb[stage](x))
        for i in range(stage, 0, -1):
            for conv in self.blocks[i - 1]:
                h = lrelu(conv(h))
            h = F.avg_pool2d(h, 2)
            if i == stage and alpha < 1.0:
                h = torch.lerp(lrelu(self.from_rgb[stage - 1](F.avg_pool2d(x, 2))), h, alpha)
        h = lrelu(self.conv_last(self.mbstd(h)))
        h = lrelu(self.conv_4x4(h))
        return self.fc(h.flatten(1))


def schedule(step: int, stages: int, phase: int) -> tuple[int, float]:
    """(stage, alpha) at optimizer step `step`: stage 0 for `phase` steps, then each later stage fades
    in over `phase` steps and trains stable for `phase` more; the last stage runs to the end."""
    if step < phase:
        return 0, 1.0
    k, r = divmod(step - phase, 2 * phase)
    if k >= stages - 1:
        return stages - 1, 1.0
    return k + 1, min(1.0, r / phase)


def real_at(x: torch.Tensor, stage: int, alpha: float) -> torch.Tensor:
    """Training images at the stage's resolution, blended during a fade-in as ProGAN does (the
    upsampled lower resolution -> the new one)."""
    size = 4 * 2 ** stage
    xs = F.adaptive_avg_pool2d(x, size) if x.shape[-1] != size else x
    if alpha < 1.0 and stage > 0:
        low = F.interpolate(F.avg_pool2d(xs, 2), scale_factor=2, mode="nearest")
        xs = torch.lerp(low, xs, alpha)
    return xs


def critic_loss(G, D, real, z, stage, alpha, fused: bool, drift: float = 1e-3, gp_weight: float = 10.0,
                generator=None):
    """WGAN-GP critic loss with ProGAN's drift term: D(fake) - D(real) + lambda GP + eps E[D(real)^2]."""
    with torch.no_grad():
        fake = G(z, stage, alpha)
    d_real, d_fake = D(real, stage, alpha), D(fake, stage, alpha)
    critic = lambda v: D(v, stage, alpha)  # noqa: E731
    gp = (genkern.gradient_penalty if fused else eager_gradient_penalty)(critic, real, fake, gp_weight,
                                                                        generator=generator)
    return d_fake.mean() - d_real.mean() + gp + drift * (d_real ** 2).mean()


def train(args) -> dict:
    device = torch.device(args.device)
    run = {k: getattr(args, k) for k in ("config", "data", "batch", "lr", "phase", "seed")}
    cfg = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    fused = not args.eager
    G, D = Generator(args.config, fused).to(device), Discriminator(args.config, fused).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    tr = TrainRun(args, run, {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d})
    run, gen = tr.run, tr.gen
    x_all, _ = data.load(run["data"], cfg["image_size"], cfg["in_channels"])

    def one_step():
        stage, alpha = schedule(tr.step, G.num_stages, run["phase"])
        idx = torch.randint(0, x_all.shape[0], (run["batch"],), generator=gen)
        real = real_at(x_all[idx], stage, alpha).to(device)
        z = torch.randn(run["batch"], G.latent, generator=gen).to(device)
        d_loss = critic_loss(G, D, real, z, stage, alpha, fused)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        z = torch.randn(run["batch"], G.latent, generator=gen).to(device)
        g_loss = -D(G(z, stage, alpha), stage, alpha).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d, g = d_loss.item(), g_loss.item()
        return (d, g), f"{4 * 2 ** stage}px a={alpha:.2f} D {d:.3f} G {g:.3f}"

    return tr.loop(one_step)


def load_generator(ckpt: str, device) -> "Generator":
    state = load_checkpoint(ckpt, device, restore_rng=False)
    G = Generator(state["run"]["config"]).to(device).eval()
    G.load_state_dict(state["G"])
    return G


@torch.no_grad()
def sample(args) -> torch.Tensor:
    """A grid of samples, then a row of slerp interpolations between two latents."""
    device = torch.device(args.device)
    G = load_generator(args.ckpt, device)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n * args.n, G.latent, generator=g)
    ends = torch.randn(2, G.latent, generator=g)
    z_path = slerp_strip(ends, args.n)
    out = G(torch.cat([z, z_path]).to(device))
    save_grid(out, args.out, nrow=args.n)
    return out


@torch.no_grad()
def evaluate(args) -> quality.Quality:
    device = torch.device(args.device)
    G = load_generator(args.ckpt, device)
    z = torch.randn(args.n, G.latent, generator=torch.Generator().manual_seed(args.seed))
    q = quality.evaluate(G(z.to(device)))
    report_quality(args, q)
    return q


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.progan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="progressive WGAN-GP training; writes OUT/ckpt.pt")
    add_train_args(t, steps=3000, out="runs/progan-digits", batch=32, lr=1e-3)
    t.add_argument("--config", default="digits", choices=sorted(CONFIGS))
    t.add_argument("--phase", type=int, default=600, help="steps per fade-in and per stable phase")
    s = sub.add_parser("sample", help="a grid of samples and a latent slerp strip (last row)")
    add_sample_args(s, ckpt="runs/progan-digits/ckpt.pt", out="progan.png")
    s.add_argument("--n", type=int, default=8, help="grid side (and strip length)")
    e = sub.add_parser("evaluate", help="score samples against the real digits (models/quality.py)")
    add_evaluate_args(e, ckpt="runs/progan-digits/ckpt.pt")
    run_cli(p.parse_args(argv), train, sample, evaluate=evaluate)


if __name__ == "__main__":
    main()
