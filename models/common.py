"""What the models' train/sample entry points share: checkpoints that resume exactly (RNG states
included), the common command-line options, and PNG grids."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

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


def add_sample_args(p: argparse.ArgumentParser, *, ckpt: str, out: str | None, out_help: str = "PNG file") -> None:
    p.add_argument("--ckpt", default=ckpt)
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    p.add_argument("--quiet", action="store_true")


def add_evaluate_args(p: argparse.ArgumentParser, *, ckpt: str) -> None:
    """The options of every model's `evaluate` (models/quality.py scores its samples)."""
    add_sample_args(p, ckpt=ckpt, out=None, out_help="JSON file for the figures (default: print only)")
    p.add_argument("--n", type=int, default=500, help="samples (class-conditional: the classes in turn)")


def report_quality(args, q, **settings) -> None:
    """Prints `q` (a models.quality.Quality) and writes it with the settings to args.out (JSON), if given."""
    print(f"{args.ckpt}: {q}" + "".join(f", {k} {v}" for k, v in settings.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**dataclasses.asdict(q), "ckpt": args.ckpt, "seed": args.seed, **settings}, f, indent=1)


def require_checkpoint(path: str) -> None:
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train first (python -m models.<name> train --out DIR)")


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """Images in [-1, 1] as a PNG grid (torchvision.utils.save_image)."""
    from torchvision.utils import save_image
    save_image(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), path, nrow=nrow, padding=1)


class TrainRun:
    """What every model's `train` shares besides the model: the run folder and its checkpoint,
    resuming (the `stateful` modules and optimizers, the data-order generator `gen`, torch's RNG),
    periodic checkpoints and the progress bar. Build the models and optimizers (after
    torch.manual_seed(args.seed)) first, then:

        tr = TrainRun(args, run, {"model": model, "opt": opt})
        ... load data with tr.run (a resumed run keeps its own settings), draw batches from tr.gen ...
        return tr.loop(one_step)   # one_step() -> (record, progress-bar text)
    """

    def __init__(self, args, run: dict, stateful: dict):
        self.args, self.device = args, torch.device(args.device)
        os.makedirs(args.out, exist_ok=True)
        self.path = os.path.join(args.out, "ckpt.pt")
        self.run, self.stateful = run, stateful
        self.gen = torch.Generator().manual_seed(args.seed)
        self.step = 0
        if args.resume and os.path.exists(self.path):
            state = load_checkpoint(self.path, self.device)
            if state["run"].get("config") != run.get("config"):
                raise ValueError(f"--resume: {self.path} holds a {state['run'].get('config')!r} run, "
                                 f"not {run.get('config')!r}")
            self.run = state["run"]
            for key, m in stateful.items():
                m.load_state_dict(state[key])
            self.gen.set_state(state["generator"])
            self.step = state["step"]
            if not args.quiet:
                print(f"resumed {self.path} at step {self.step}")

    def checkpoint(self) -> None:
        save_checkpoint(self.path, self.device, run=self.run, step=self.step, generator=self.gen.get_state(),
                        **{key: m.state_dict() for key, m in self.stateful.items()})

    def loop(self, one_step) -> dict:
        """Calls one_step() up to args.steps (checkpointing every args.ckpt_every and at the end)."""
        from tqdm.auto import tqdm
        bar = tqdm(total=self.args.steps, initial=self.step, desc="train", disable=self.args.quiet)
        history, t0 = [], time.time()
        while self.step < self.args.steps:
            record, text = one_step()
            self.step += 1
            history.append(record)
            bar.update(1)
            bar.set_postfix_str(text)
            if self.args.ckpt_every and self.step % self.args.ckpt_every == 0:
                self.checkpoint()
        bar.close()
        self.checkpoint()
        took = time.time() - t0
        if not self.args.quiet:
            print(f"{len(history)} steps in {took:.0f} s; checkpoint {self.path}")
        return {"steps": self.step, "history": history, "seconds": took, "checkpoint": self.path}


def run_cli(args, train, sample, **commands) -> None:
    """Dispatches the parsed `train` / `sample` sub-command, or one of `commands` (name -> function of
    the parsed arguments) that reads a checkpoint as `sample` does."""
    if args.cmd == "train":
        train(args)
    else:
        require_checkpoint(args.ckpt)
        commands.get(args.cmd, sample)(args)
