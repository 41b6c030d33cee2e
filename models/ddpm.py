"""Train and sample the DDPM U-Net (models/unet.py) on real data.

    python -m models.ddpm train  --config digits --steps 1500 --out runs/ddpm-digits
    python -m models.ddpm sample --ckpt runs/ddpm-digits/ckpt.pt --out digits.png --guidance 2
    python -m models.ddpm evaluate --ckpt runs/ddpm-digits/ckpt.pt --n 500

Training (Ho et al. 2020, algorithm 1): x_t = add_noise(x_0, eps, t) with t uniform, loss
||eps - eps_theta(x_t, t)||^2, Adam, an EMA of the weights for sampling. Class-conditional configs
drop the label to the null label with p = 0.1 (classifier-free guidance, Ho & Salimans 2022).
Checkpoints (torch.save) hold the model, the EMA, the optimizer, the step and the RNG state:
``--resume`` continues a run exactly where it stopped.

Sampling uses genkern's fused samplers (DDPM or DDIM steps, in-kernel noise, guidance in the step),
and writes a PNG grid (torchvision.utils.save_image): one row per class label, or, with
``--inpaint``, rows of known images, their masked versions and the completions.

``evaluate`` draws n class-conditional samples (the digits in turn) and scores them against the real digits
(models/quality.py: a real-digit classifier's accuracy on their labels, and a Fréchet distance).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from genkern.diffusion import DDIMScheduler, DDPMScheduler, sample as run_sampler

from . import data, quality
from .common import (TrainRun, add_evaluate_args, add_sample_args, add_train_args, load_checkpoint, report_quality,
                     run_cli, save_grid)
from .ema import EMA
from .unet import CONFIGS, UNet


def scheduler_kwargs(args_or_dict) -> dict:
    a = args_or_dict if isinstance(args_or_dict, dict) else vars(args_or_dict)
    return {"num_train_timesteps": a["timesteps"],
            "beta_schedule": "squaredcos_cap_v2" if a["schedule"] == "cosine" else "linear"}


def build(run: dict, device, fused: bool = True) -> UNet:
    return UNet(run["config"], fused=fused).to(device)


def train(args) -> dict:
    device = torch.device(args.device)
    run = {k: getattr(args, k) for k in ("config", "timesteps", "schedule", "data", "batch", "lr", "ema",
                                         "p_uncond", "seed")}
    cfg = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    model = build(run, device, fused=not args.eager)
    ema = EMA(model, args.ema)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    tr = TrainRun(args, run, {"model": model, "ema": ema, "opt": opt})
    run, gen = tr.run, tr.gen
    x_all, y_all = data.load(run["data"], cfg.image_size, cfg.in_channels)
    sched = DDPMScheduler(**scheduler_kwargs(run))
    T, null = run["timesteps"], model.null_label
    model.train()
    recent = []

    def one_step():
        idx = torch.randint(0, x_all.shape[0], (run["batch"],), generator=gen)
        x0 = x_all[idx].to(device)
        t = torch.randint(0, T, (run["batch"],), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        labels = None
        if null is not None:
            drop = torch.rand(run["batch"], generator=gen) < run["p_uncond"]
            labels = torch.where(drop, torch.full_like(y_all[idx], null), y_all[idx]).to(device)
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, labels), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        recent[:] = (recent + [loss.item()])[-50:]
        return loss.item(), f"loss {sum(recent) / len(recent):.4f}"

    return tr.loop(one_step)


def load_for_sampling(ckpt: str, device, use_ema: bool = True, fused: bool = True) -> tuple[UNet, dict]:
    state = load_checkpoint(ckpt, device, restore_rng=False)
    model = build(state["run"], device, fused=fused)
    model.load_state_dict(state["ema"]["model"] if use_ema else state["model"])
    return model.eval(), state["run"]


@torch.no_grad()
def sample(args) -> torch.Tensor:
    device = torch.device(args.device)
    model, run = load_for_sampling(args.ckpt, device, use_ema=not args.no_ema)
    cfg = CONFIGS[run["config"]]
    kw = scheduler_kwargs(run)
    sched = DDIMScheduler(**kw) if args.sampler == "ddim" else DDPMScheduler(**kw)
    steps = args.steps or (50 if args.sampler == "ddim" else run["timesteps"])
    shape_of = lambda n: (n, cfg.in_channels, cfg.image_size, cfg.image_size)  # noqa: E731
    common = dict(num_inference_steps=steps, seed=args.seed, device=device, progress=not args.quiet)
    if args.sampler == "ddim":
        common["eta"] = args.eta
    if args.inpaint:
        x_all, y_all = data.load(run["data"], cfg.image_size, cfg.in_channels)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(x_all.shape[0], generator=g)[:args.n]
        known = x_all[idx].to(device)
        mask = torch.ones_like(known)
        mask[..., cfg.image_size // 2:, :] = 0  # keep the top half, complete the bottom half
        labels = y_all[idx].to(device) if model.null_label is not None else None
        out = run_sampler(model, sched, shape_of(args.n), class_labels=labels, mask=mask, known=known,
                          guidance_scale=args.guidance if labels is not None else None, null_label=model.null_label,
                          **common)
        grid = torch.cat([known, known * mask - (1 - mask), out])
        nrow = args.n
    elif model.null_label is not None:
        labels = parse_labels(args.labels, cfg.num_classes).repeat_interleave(args.n).to(device)
        out = run_sampler(model, sched, shape_of(labels.numel()), class_labels=labels,
                          guidance_scale=args.guidance, null_label=model.null_label, **common)
        grid, nrow = out, args.n
    else:
        out = run_sampler(model, sched, shape_of(args.n), **common)
        grid, nrow = out, int(args.n ** 0.5) or 1
    save_grid(grid, args.out, nrow)
    if not args.quiet:
        print(f"wrote {args.out}")
    return out


@torch.no_grad()
def evaluate(args) -> quality.Quality:
    device = torch.device(args.device)
    model, run = load_for_sampling(args.ckpt, device, use_ema=not args.no_ema)
    cfg = CONFIGS[run["config"]]
    if run["data"] != "digits" or model.null_label is None or cfg.in_channels != 1:
        raise SystemExit(f"evaluate: needs a class-conditional model trained on the digits, {args.ckpt} holds "
                         f"config {run['config']!r} trained on {run['data']!r}")
    labels = quality.balanced_labels(args.n, cfg.num_classes)
    out = run_sampler(model, DDIMScheduler(**scheduler_kwargs(run)),
                      (labels.numel(), cfg.in_channels, cfg.image_size, cfg.image_size),
                      class_labels=labels.to(device), guidance_scale=args.guidance, null_label=model.null_label,
                      num_inference_steps=args.steps, eta=0.0, seed=args.seed, device=device, progress=not args.quiet)
    q = quality.evaluate(out, labels)
    report_quality(args, q, ddim_steps=args.steps, guidance=args.guidance, ema=not args.no_ema)
    return q


def parse_labels(spec: str, num_classes: int) -> torch.Tensor:
    labels = list(range(num_classes)) if spec == "all" else [int(v) for v in spec.split(",")]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels must lie in [0, {num_classes}), got {bad}")
    return torch.tensor(labels, dtype=torch.int64)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m models.ddpm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or --resume) a U-Net; writes OUT/ckpt.pt")
    add_train_args(t, steps=1500, out="runs/ddpm-digits", batch=64, lr=1e-3)
    t.add_argument("--config", default="digits", choices=sorted(CONFIGS))
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay (the paper: 0.9999 over 800k steps)")
    t.add_argument("--timesteps", type=int, default=1000, help="T of the schedule (500 also common)")
    t.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    t.add_argument("--p-uncond", dest="p_uncond", type=float, default=0.1, help="label dropout for CFG")
    s = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    add_sample_args(s, ckpt="runs/ddpm-digits/ckpt.pt", out="samples.png")
    s.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"])
    s.add_argument("--steps", type=int, default=None, help="reverse steps (default: 50 DDIM, T for DDPM)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    s.add_argument("--labels", default="all", help="class labels, e.g. 0,3,7, or all (one row each)")
    s.add_argument("--n", type=int, default=8, help="samples per label (per row)")
    s.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight w")
    s.add_argument("--inpaint", action="store_true", help="complete the bottom half of real images")
    s.add_argument("--no-ema", dest="no_ema", action="store_true", help="sample the raw weights, not the EMA")
    e = sub.add_parser("evaluate", help="score class-conditional digit samples against the real digits")
    add_evaluate_args(e, ckpt="runs/ddpm-digits/ckpt.pt")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight w")
    e.add_argument("--no-ema", dest="no_ema", action="store_true", help="sample the raw weights, not the EMA")
    run_cli(p.parse_args(argv), train, sample, evaluate=evaluate)


if __name__ == "__main__":
    main()
