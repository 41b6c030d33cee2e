"""DCGAN (Radford, Metz & Chintala 2016), class-conditional if asked, and its WGAN-GP critic variant.

Generator: z (+ a one-hot label) -> 4x4 transposed conv -> (BatchNorm, ReLU, stride-2 transposed
conv) per doubling -> tanh. Discriminator: stride-2 convs with LeakyReLU(0.2) and BatchNorm (none
after the first), a 4x4 conv to one logit; conditional: the label enters as one-hot planes beside
the image channels. Losses: `--loss gan`, the non-saturating GAN loss with BCE, Adam(2e-4, 0.5);
`--loss wgan-gp`, a critic without BatchNorm (the penalty is per sample; Gulrajani et al. 2017),
lambda = 10, 5 critic steps per generator step, Adam(1e-4, (0.5, 0.9)). The penalty is genkern's
fused gradient_penalty in the fused build and the eager formula otherwise; DCGAN has no other layer
that genkern fuses, so that is the whole difference between the builds.

    python -m models.dcgan train --conditional --out runs/dcgan-digits
    python -m models.dcgan sample --ckpt runs/dcgan-digits/ckpt.pt --out dcgan.png
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import genkern

from . import data, quality
from .common import (TrainRun, add_evaluate_args, add_sample_args, add_train_args, load_checkpoint, report_quality,
                     run_cli, save_grid)
from .layers import eager_gradient_penalty, slerp_strip

CONFIGS = {
    "digits": {"image_size": 16, "in_channels": 1, "latent": 64, "ch": 32, "num_classes": 10},
    "cifar10": {"image_size": 32, "in_channels": 3, "latent": 100, "ch": 64, "num_classes": 10},
}


def _doublings(size: int) -> int:
    n = int(math.log2(size // 4))
    if 4 * 2 ** n != size:
        raise ValueError(f"DCGAN: image_size must be 4 * 2**k, got {size}")
    return n


class Generator(nn.Module):
    def __init__(self, config: str = "digits", conditional: bool = False):
        super().__init__()
        c = CONFIGS[config]
        self.latent, self.num_classes = c["latent"], c["num_classes"] if conditional else 0
        n = _doublings(c["image_size"])
        chs = [c["ch"] * 2 ** (n - i) for i in range(n + 1)]  # e.g. 4c, 2c, c from 4x4 up
        layers = [nn.ConvTranspose2d(self.latent + self.num_classes, chs[0], 4, 1, 0, bias=False)]
        for i in range(n):
            layers += [nn.BatchNorm2d(chs[i]), nn.ReLU(True)]
            last = i == n - 1
            layers.append(nn.ConvTranspose2d(chs[i], c["in_channels"] if last else chs[i + 1], 4, 2, 1, bias=last))
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z)], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN discriminator; `critic=True`: the WGAN-GP critic (no BatchNorm)."""

    def __init__(self, config: str = "digits", conditional: bool = False, critic: bool = False):
        super().__init__()
        c = CONFIGS[config]
        self.num_classes = c["num_classes"] if conditional else 0
        n = _doublings(c["image_size"])
        cin = c["in_channels"] + self.num_classes
        layers = []
        for i in range(n):
            cout = c["ch"] * 2 ** i
            layers.append(nn.Conv2d(cin, cout, 4, 2, 1, bias=critic or i == 0))
            if i > 0 and not critic:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, True))
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            planes = F.one_hot(labels, self.num_classes).to(x)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], 1)
        return self.net(x).flatten()


def init_weights(m: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def discriminator_loss(G, D, real, labels, z, loss: str, fused: bool, generator=None) -> torch.Tensor:
    with torch.no_grad():
        fake = G(z, labels)
    d_real, d_fake = D(real, labels), D(fake, labels)
    if loss == "gan":
        return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    critic = lambda v: D(v, labels)  # noqa: E731
    gp = (genkern.gradient_penalty if fused else eager_gradient_penalty)(critic, real, fake, 10.0, generator=generator)
    return d_fake.mean() - d_real.mean() + gp


def generator_loss(G, D, labels, z, loss: str) -> torch.Tensor:
    d = D(G(z, labels), labels)
    return F.binary_cross_entropy_with_logits(d, torch.ones_like(d)) if loss == "gan" else -d.mean()


def build(run: dict, device):
    G = Generator(run["config"], run["conditional"]).to(device)
    D = Discriminator(run["config"], run["conditional"], critic=run["loss"] == "wgan-gp").to(device)
    return G, D


def train(args) -> dict:
    device = torch.device(args.device)
    if args.lr is None:
        args.lr = 2e-4 if args.loss == "gan" else 1e-4
    run = {k: getattr(args, k) for k in ("config", "data", "batch", "lr", "loss", "conditional", "n_critic", "seed")}
    cfg = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    fused = not args.eager
    G, D = build(run, device)
    G.apply(init_weights)
    D.apply(init_weights)
    betas = (0.5, 0.999) if args.loss == "gan" else (0.5, 0.9)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas)
    tr = TrainRun(args, run, {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d})
    run, gen = tr.run, tr.gen
    x_all, y_all = data.load(run["data"], cfg["image_size"], cfg["in_channels"])
    n_critic = run["n_critic"] if run["loss"] == "wgan-gp" else 1

    def batch():
        idx = torch.randint(0, x_all.shape[0], (run["batch"],), generator=gen)
        z = torch.randn(run["batch"], G.latent, generator=gen).to(device)
        labels = y_all[idx].to(device) if run["conditional"] else None
        return x_all[idx].to(device), labels, z

    def one_step():
        for _ in range(n_critic):
            real, labels, z = batch()
            d_loss = discriminator_loss(G, D, real, labels, z, run["loss"], fused)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        _, labels, z = batch()
        g_loss = generator_loss(G, D, labels, z, run["loss"])
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d, g = d_loss.item(), g_loss.item()
        return (d, g), f"D {d:.3f} G {g:.3f}"

    return tr.loop(one_step)


def load_generator(ckpt: str, device) -> "Generator":
    state = load_checkpoint(ckpt, device, restore_rng=False)
    G, _ = build(state["run"], device)
    G.load_state_dict(state["G"])
    return G.eval()


@torch.no_grad()
def sample(args) -> torch.Tensor:
    """A grid (conditional: one row per class), then a row of slerp interpolations between two latents."""
    device = torch.device(args.device)
    G = load_generator(args.ckpt, device)
    g = torch.Generator().manual_seed(args.seed)
    rows = G.num_classes or args.n
    labels = torch.arange(rows).repeat_interleave(args.n) if G.num_classes else None
    z = torch.randn(rows * args.n, G.latent, generator=g)
    ends = torch.randn(2, G.latent, generator=g)
    z_path = slerp_strip(ends, args.n)
    if labels is not None:
        labels = torch.cat([labels, torch.zeros(args.n, dtype=torch.int64)]).to(device)
    out = G(torch.cat([z, z_path]).to(device), labels)
    save_grid(out, args.out, nrow=args.n)
    return out


@torch.no_grad()
def evaluate(args) -> quality.Quality:
    device = torch.device(args.device)
    G = load_generator(args.ckpt, device)
    z = torch.randn(args.n, G.latent, generator=torch.Generator().manual_seed(args.seed))
    labels = quality.balanced_labels(args.n, G.num_classes) if G.num_classes else None
    q = quality.evaluate(G(z.to(device), None if labels is None else labels.to(device)), labels)
    report_quality(args, q)
    return q


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.dcgan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a DCGAN (or its WGAN-GP critic variant); writes OUT/ckpt.pt")
    add_train_args(t, steps=2000, out="runs/dcgan-digits", batch=64, lr=None)  # default: by --loss
    t.add_argument("--config", default="digits", choices=sorted(CONFIGS))
    t.add_argument("--loss", default="gan", choices=["gan", "wgan-gp"])
    t.add_argument("--conditional", action="store_true", help="class-conditional G and D")
    t.add_argument("--n-critic", dest="n_critic", type=int, default=5, help="critic steps per G step (wgan-gp)")
    s = sub.add_parser("sample", help="a grid of samples (a row per class) and a latent slerp strip (last row)")
    add_sample_args(s, ckpt="runs/dcgan-digits/ckpt.pt", out="dcgan.png")
    s.add_argument("--n", type=int, default=8, help="samples per row")
    e = sub.add_parser("evaluate", help="score samples against the real digits (models/quality.py)")
    add_evaluate_args(e, ckpt="runs/dcgan-digits/ckpt.pt")
    run_cli(p.parse_args(argv), train, sample, evaluate=evaluate)


if __name__ == "__main__":
    main()
