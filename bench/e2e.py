"""End-to-end DDPM sampling: the whole reverse loop of the DDPM U-Net (models/unet.py), images/s.

  python -m bench.e2e --device cuda                  # 256 CIFAR-10-size images, 1000 steps, bf16
  python -m bench.e2e --device cpu --batch 8 --steps 5 --dtype float32

Contenders, the same weights in each:
  eager           torch.nn layers (GroupNorm, then SiLU) and the eager DDPM step as diffusers computes
                  it, with torch.randn_like noise
  genkern         fused GroupNorm+SiLU layers and the fused step (genkern.diffusion.sample, noise drawn
                  in the kernel)
  genkern+graphs  as genkern, with the network call captured once in a CUDA graph and replayed every
                  step (the step itself is one kernel launch with host scalars, so it stays outside)
The DDPM paper reports 256 CIFAR-10 samples in 17 s on a TPU v3-8 (about 15 images/s).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import genkern
from genkern.diffusion import DDPMScheduler, sample
from models.unet import UNet


def eager_sample(model, sched, shape, device, dtype, seed):
    """The reverse loop as a plain PyTorch user writes it (diffusers' DDPM step, clip to [-1, 1])."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    abar = sched._abar
    ts = list(sched._host_timesteps)
    for i, t in enumerate(ts):
        eps = model(x, torch.full((shape[0],), t, device=device, dtype=torch.int64))
        a_t, a_p = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
        cur = a_t / a_p
        x_new = (a_p ** 0.5 * (1 - cur) / (1 - a_t)) * x0 + (cur ** 0.5 * (1 - a_p) / (1 - a_t)) * x
        if i + 1 < len(ts):
            var = (1 - a_p) / (1 - a_t) * (1 - cur)
            x_new = x_new + var ** 0.5 * torch.randn(shape, generator=g, device=device, dtype=dtype)
        x = x_new
    return x


class GraphedModel:
    """model(x, t) replayed from one CUDA graph: static input buffers, the output read in place."""

    def __init__(self, model, shape, device, dtype):
        self.x = torch.randn(shape, device=device, dtype=dtype)
        self.t = torch.zeros(shape[0], device=device, dtype=torch.int64)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up on a side stream, as torch.cuda.graphs asks
                model(self.x, self.t)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model(self.x, self.t)

    def __call__(self, x, t):
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000, help="reverse steps (T of the schedule)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--impls", default="eager,genkern,genkern+graphs")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    fused = UNet(args.config, fused=True).to(device=device, dtype=dtype).eval()
    eager = UNet(args.config, fused=False).to(device=device, dtype=dtype).eval()
    eager.load_state_dict(fused.state_dict())
    cfg = fused.config
    shape = (args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    sched = DDPMScheduler(num_train_timesteps=args.steps)
    impls = [i for i in args.impls.split(",") if i and (i != "genkern+graphs" or device == "cuda")]
    print(f"DDPM sampling, {args.config} U-Net ({sum(p.numel() for p in fused.parameters()) / 1e6:.1f}M params), "
          f"{args.batch} images x {args.steps} steps, {str(dtype).replace('torch.', '')} on {device}, "
          f"genkern backend {genkern.backends(device)}", flush=True)

    graphed = {}

    def run(name, scheduler):
        if name == "eager":
            return eager_sample(eager, scheduler, shape, device, dtype, seed=1)
        if name == "genkern+graphs" and not graphed:  # captured once, in the warm-up run (not timed)
            graphed["model"] = GraphedModel(fused, shape, device, dtype)
        model = graphed["model"] if name == "genkern+graphs" else fused
        return sample(model, scheduler, shape, seed=1, device=device, dtype=dtype, progress=False)

    results = {}
    with torch.no_grad():
        for name in impls:
            # warm-up: a short run compiles kernels and fills the allocator's caches
            short = DDPMScheduler(num_train_timesteps=args.steps)
            short.set_timesteps(min(3, args.steps))
            run(name, short)
            sync(device)
            t0 = time.perf_counter()
            out = run(name, sched)
            sync(device)
            dt = time.perf_counter() - t0
            ok = bool(torch.isfinite(out).all())
            results[name] = dict(seconds=dt, images_per_s=args.batch / dt, ms_per_step=dt / args.steps * 1e3,
                                 finite=ok)
            print(f"{name:15s} {dt:8.2f} s  {args.batch / dt:8.1f} images/s  {dt / args.steps * 1e3:7.2f} ms/step"
                  f"{'' if ok else '  NON-FINITE OUTPUT'}", flush=True)
    base = results.get("eager", {}).get("seconds")
    if base:
        for name, r in results.items():
            r["speedup_vs_eager"] = base / r["seconds"]
        print("speedup vs eager: " + ", ".join(f"{n} {r['speedup_vs_eager']:.2f}x" for n, r in results.items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(config=args.config, batch=args.batch, steps=args.steps, dtype=str(dtype), device=device,
                           device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
