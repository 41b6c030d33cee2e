"""A convolutional VAE (Kingma & Welling 2014) with GroupNorm+SiLU ResNet blocks, as in the
autoencoders of latent diffusion (Rombach et al. 2022), at laptop size.

Encoder: conv -> per level (ResBlock, stride-2 conv) -> ResBlock -> GroupNorm+SiLU -> conv to
(mu, log var) of a latent [z_channels, S/4, S/4]; the decoder mirrors it with nearest upsampling.
Training maximises the ELBO: loss = ||x - x^||^2 / (2 sigma^2) + beta * KL(q(z|x) || N(0, I)),
both summed over the pixels / latent and averaged over the batch, with a Gaussian decoder of fixed
sigma (0.1 by default) and the reparameterisation z = mu + exp(logvar / 2) * eps. `fused=True` runs
every GroupNorm+SiLU as one genkern kernel; the eager build has the same parameters.

    python -m models.vae train --out runs/vae-digits
    python -m models.vae sample --ckpt runs/vae-digits/ckpt.pt --out vae.png
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from . import data, quality
from .common import (TrainRun, add_evaluate_args, add_sample_args, add_train_args, load_checkpoint, report_quality,
                     run_cli, save_grid)
from .layers import group_norm_silu, slerp_strip

CONFIGS = {
    "digits": {"image_size": 16, "in_channels": 1, "ch": (32, 64), "z_channels": 4, "groups": 8},
    "cifar10": {"image_size": 32, "in_channels": 3, "ch": (64, 128), "z_channels": 4, "groups": 32},
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, fused: bool):
        super().__init__()
        self.norm1 = group_norm_silu(fused, groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm_silu(fused, groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.conv2(self.norm2(self.conv1(self.norm1(x))))


class VAE(nn.Module):
    def __init__(self, config: str = "digits", fused: bool = True):
        super().__init__()
        c = CONFIGS[config]
        ch, g, zc = c["ch"], c["groups"], c["z_channels"]
        self.config = config
        self.latent_shape = (zc, c["image_size"] // 2 ** len(ch), c["image_size"] // 2 ** len(ch))
        enc = [nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)]
        cin = ch[0]
        for cout in ch:
            enc += [ResBlock(cin, cout, g, fused), nn.Conv2d(cout, cout, 3, stride=2, padding=1)]
            cin = cout
        enc += [ResBlock(cin, cin, g, fused), group_norm_silu(fused, g, cin), nn.Conv2d(cin, 2 * zc, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(zc, cin, 3, padding=1), ResBlock(cin, cin, g, fused)]
        for cout in reversed(ch):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                    ResBlock(cout, cout, g, fused)]
            cin = cout
        dec += [group_norm_silu(fused, g, cin), nn.Conv2d(cin, c["in_channels"], 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction, mu, logvar) with z = mu + sigma * eps drawn from `generator`."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=generator.device if generator else mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)
        return self.decode(z), mu, logvar


def elbo_loss(x, recon, mu, logvar, sigma: float = 0.1, beta: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Negative ELBO per image: Gaussian reconstruction term + beta * KL, both summed per image."""
    n = x.shape[0]
    rec = ((x - recon) ** 2).sum() / (2 * sigma ** 2) / n
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum() / n
    return rec + beta * kl, {"rec": rec.item(), "kl": kl.item()}


def train(args) -> dict:
    device = torch.device(args.device)
    run = {k: getattr(args, k) for k in ("config", "data", "batch", "lr", "sigma", "beta", "seed")}
    cfg = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    model = VAE(args.config, fused=not args.eager).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    tr = TrainRun(args, run, {"model": model, "opt": opt})
    run, gen = tr.run, tr.gen
    x_all, _ = data.load(run["data"], cfg["image_size"], cfg["in_channels"])

    def one_step():
        idx = torch.randint(0, x_all.shape[0], (run["batch"],), generator=gen)
        x = x_all[idx].to(device)
        recon, mu, logvar = model(x, generator=gen)
        loss, parts = elbo_loss(x, recon, mu, logvar, run["sigma"], run["beta"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item(), f"-ELBO {loss.item():.1f} (rec {parts['rec']:.1f}, KL {parts['kl']:.1f})"

    return tr.loop(one_step)


def load_model(ckpt: str, device) -> tuple["VAE", dict]:
    state = load_checkpoint(ckpt, device, restore_rng=False)
    model = VAE(state["run"]["config"]).to(device).eval()
    model.load_state_dict(state["model"])
    return model, state["run"]


@torch.no_grad()
def sample(args) -> torch.Tensor:
    """Rows of decoded z ~ N(0, I), then a row interpolating (slerp) between two real images' codes."""
    device = torch.device(args.device)
    model, run = load_model(args.ckpt, device)
    cfg = CONFIGS[run["config"]]
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn((args.n * args.n,) + model.latent_shape, generator=g).to(device)
    x_all, _ = data.load(run["data"], cfg["image_size"], cfg["in_channels"])
    pair = x_all[torch.randperm(x_all.shape[0], generator=g)[:2]].to(device)
    mu, _ = model.encode(pair)
    path = slerp_strip(mu, args.n)
    out = model.decode(torch.cat([z, path]))
    save_grid(out, args.out, nrow=args.n)
    return out


@torch.no_grad()
def evaluate(args) -> quality.Quality:
    """Decoded z ~ N(0, I) (the decoder's mean), scored against the real digits."""
    device = torch.device(args.device)
    model, _ = load_model(args.ckpt, device)
    z = torch.randn((args.n,) + model.latent_shape, generator=torch.Generator().manual_seed(args.seed))
    q = quality.evaluate(model.decode(z.to(device)))
    report_quality(args, q)
    return q


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.vae", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the VAE on the negative ELBO; writes OUT/ckpt.pt")
    add_train_args(t, steps=2000, out="runs/vae-digits", batch=64, lr=1e-3)
    t.add_argument("--config", default="digits", choices=sorted(CONFIGS))
    t.add_argument("--sigma", type=float, default=0.1, help="the Gaussian decoder's fixed standard deviation")
    t.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE)")
    s = sub.add_parser("sample", help="decoded samples and a slerp strip between two encoded digits")
    add_sample_args(s, ckpt="runs/vae-digits/ckpt.pt", out="vae.png")
    s.add_argument("--n", type=int, default=8, help="grid side (and strip length)")
    e = sub.add_parser("evaluate", help="score decoded prior samples against the real digits (models/quality.py)")
    add_evaluate_args(e, ckpt="runs/vae-digits/ckpt.pt")
    run_cli(p.parse_args(argv), train, sample, evaluate=evaluate)


if __name__ == "__main__":
    main()
