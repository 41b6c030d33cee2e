"""What the models' train/sample entry points share: checkpoints that resume exactly (RNG states
included), the common command-line options, and PNG grids."""
from __future__ import annotations

import argparse
import os

import torch


def save_checkpoint(path: str, device: torch.device, **state) -> None:
    """torch.save of `state` plus torch's RNG states (dropout, in-model randomness), atomically."""
    state["torch_rng"] = torch.get_rng_state()
    state["cuda_rng"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a checkpoint is never half-written


def load_checkpoint(path: str, device: torch.device, restore_rng: bool = True) -> dict:
    state = torch.load(path, map_location=device, weights_only=False)
    if restore_rng:
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return state


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_train_args(p: argparse.ArgumentParser, *, steps: int, out: str, batch: int, lr: float) -> None:
    p.add_argument("--data", default="digits", help="digits | cifar10:DIR | folder:DIR (never downloaded)")
    p.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--out", default=out, help="run folder: OUT/ckpt.pt")
    p.add_argument("--ckpt-every", dest="ckpt_every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt up to --steps")
    p.add_argument("--eager", action="store_true", help="train the eager build (same weights layout)")
    p.add_argument("--quiet", action="store_true")


def add_sample_args(p: argparse.ArgumentParser, *, ckpt: str, out: str) -> None:
    p.add_argument("--ckpt", default=ckpt)
    p.add_argument("--out", default=out, help="PNG file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--quiet", action="store_true")


def require_checkpoint(path: str) -> None:
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train first (python -m models.<name> train --out DIR)")


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """Images in [-1, 1] as a PNG grid (torchvision.utils.save_image)."""
    from torchvision.utils import save_image
    save_image(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), path, nrow=nrow, padding=1)
