"""End to end: DDPM sampling with the DDPM U-Net (models/unet.py), images/s, and one WGAN-GP critic
step of the ProGAN discriminator (models/progan.py), fused vs eager; `--profile` adds where the time
goes (torch.profiler self time, summed by op class).

  python -m bench.e2e --device cuda                  # 256 CIFAR-10-size images, 1000 steps, bf16
  python -m bench.e2e --device cpu --batch 8 --steps 5 --critic --profile

Contenders, the same weights in each:
  eager           torch.nn layers (GroupNorm, then SiLU) and the eager DDPM step as diffusers computes
                  it, with torch.randn_like noise
  genkern         fused GroupNorm+SiLU layers and the fused step (genkern.diffusion.sample, noise drawn
                  in the kernel)
  genkern+graphs  as genkern, with the network call captured once in a CUDA graph and replayed every
                  step (the step itself is one kernel launch with host scalars, so it stays outside)
  genkern+compile, genkern+compile+graphs (opt-in, --impls): the fused network through
                  torch.compile (default mode, fullgraph; genkern's ops stay opaque custom ops and
                  Inductor fuses the elementwise work around them), then optionally graphed as above;
                  the compile (about a minute on a GPU) happens in the untimed warm-up
Model, input and loop run in channels_last (--no-channels-last: NCHW), every contender alike, and so
does the critic step; on CUDA cuDNN picks its convolution algorithms by timing them (--no-cudnn-benchmark:
its heuristics).
The DDPM paper reports 256 CIFAR-10 samples in 17 s on a TPU v3-8 (about 15 images/s).
The critic step (--critic): D(real), D(fake), the gradient penalty through D's double backward, the
drift term, backward and an Adam step; fused = genkern's pixel norm / minibatch stddev / penalty.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

import genkern
from genkern.diffusion import DDPMScheduler, sample
from models.unet import UNet

from .harness import device_name


def eager_sample(model, sched, shape, device, dtype, seed, memory_format):
    """The reverse loop as a plain PyTorch user writes it (diffusers' DDPM step, clip to [-1, 1])."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype).contiguous(memory_format=memory_format)
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

    def __init__(self, model, shape, device, dtype, memory_format):
        self.x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
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


IMPLS = ("eager", "genkern", "genkern+graphs", "genkern+compile", "genkern+compile+graphs")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Op classes for the profile summary, first match wins (names as torch.profiler reports them).
OP_CLASSES = [
    ("genkern kernels", ("genkern::",)),
    ("convolution", ("conv", "mkldnn_convolution", "cudnn", "winograd", "implicit_gemm")),
    ("matmul / attention", ("mm", "matmul", "linear", "attention", "bmm", "gemm", "sdpa", "flash")),
    ("normalization", ("group_norm", "native_group_norm", "batch_norm", "layer_norm")),
    ("random numbers", ("randn", "normal", "rand", "philox")),
    ("autograd / copies", ("copy", "clone", "contiguous", "to_copy", "empty", "zero", "fill", "cat", "stack")),
    ("elementwise", ("add", "sub", "mul", "div", "silu", "sigmoid", "leaky", "relu", "clamp", "sqrt", "rsqrt",
                     "pow", "exp", "lerp", "mean", "sum", "norm", "where", "neg", "tanh", "sin", "cos")),
]


def op_class(name: str) -> str:
    n = name.lower()
    for cls, keys in OP_CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


def profile_summary(fn, device, label: str) -> dict:
    """Self time by op class for one call of fn, printed as a table; returns {class: ms}."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    totals: dict = {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total if device == "cuda" else ev.self_cpu_time_total
        if t > 0 and not ev.key.startswith("ProfilerStep"):
            totals[op_class(ev.key)] = totals.get(op_class(ev.key), 0.0) + t / 1e3
    total = sum(totals.values()) or 1.0
    print(f"  where the time goes, {label} ({'GPU' if device == 'cuda' else 'CPU'} self time):")
    for cls, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {cls:20s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    return totals


def critic_step_bench(device, dtype, batch: int, config: str, reps: int, profile: bool,
                      memory_format=torch.contiguous_format) -> dict:
    """One WGAN-GP critic step of the ProGAN discriminator at full resolution, fused vs eager; networks and
    real images in `memory_format`."""
    from models import progan
    torch.manual_seed(0)
    G = progan.Generator(config, fused=True).to(device=device, dtype=dtype, memory_format=memory_format)
    size = progan.CONFIGS[config]["image_size"]
    real = torch.rand(batch, progan.CONFIGS[config]["in_channels"], size, size, device=device, dtype=dtype) * 2 - 1
    real = real.contiguous(memory_format=memory_format)
    z = torch.randn(batch, G.latent, device=device, dtype=dtype)
    builds = {}
    for name, fused in (("eager", False), ("genkern", True)):
        D = progan.Discriminator(config, fused=fused).to(device=device, dtype=dtype, memory_format=memory_format)
        if builds:
            D.load_state_dict(next(iter(builds.values()))[0].state_dict())
        builds[name] = (D, torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.99)), fused)

    def step(name):
        D, opt, fused = builds[name]
        loss = progan.critic_loss(G, D, real, z, G.num_stages - 1, 1.0, fused)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {n: [] for n in builds}
    for n in builds:  # warm-up
        step(n)
    for _ in range(reps):  # interleaved
        for n in builds:
            sync(device)
            t0 = time.perf_counter()
            step(n)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    res = {}
    layout = "channels_last" if memory_format == torch.channels_last else "NCHW"
    print(f"WGAN-GP critic step, ProGAN discriminator ({config}, {size}x{size}), batch {batch}, "
          f"{str(dtype).replace('torch.', '')} on {device}, {layout}, median of {reps}:")
    for n, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        res[n] = dict(ms=med * 1e3)
        print(f"  {n:10s} {med * 1e3:8.2f} ms")
    res["genkern"]["speedup_vs_eager"] = res["eager"]["ms"] / res["genkern"]["ms"]
    print(f"  speedup vs eager: {res['genkern']['speedup_vs_eager']:.2f}x")
    if profile:
        for n in builds:
            res[n]["profile_ms"] = profile_summary(lambda n=n: step(n), device, f"critic step, {n}")
    return res


def network_flops(config: str, shape) -> int:
    """FLOPs of one U-Net call on a batch of `shape` (torch's flop counter on a meta copy: convolutions,
    matmuls and attention; the elementwise work is not counted), for the achieved TFLOP/s beside
    images/s: how far the sampling loop is from the tensor cores' peak."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(config, fused=False).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.empty(shape, device="meta"), torch.zeros(shape[0], dtype=torch.int64, device="meta"))
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000, help="reverse steps (T of the schedule)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--impls", default="eager,genkern,genkern+graphs",
                   help="comma-separated, from: " + ", ".join(IMPLS) + " (graphs: CUDA only)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--critic", action="store_true", help="also time a WGAN-GP critic step of the ProGAN D")
    p.add_argument("--critic-config", default="cifar10", help="ProGAN config for --critic")
    p.add_argument("--critic-batch", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="print where the time goes, by op class")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="run the U-Net, its input and the sampling loop in channels_last (default; the "
                        "convolutions run faster so, on the Xeon too)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN time its convolution algorithms for the loop's fixed shapes (default; every "
                        "contender alike, as a user of a fixed-shape sampling loop would)")
    args = p.parse_args(argv)
    device = args.device
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    fused = UNet(args.config, fused=True).to(device=device, dtype=dtype, memory_format=fmt).eval()
    eager = UNet(args.config, fused=False).to(device=device, dtype=dtype, memory_format=fmt).eval()
    eager.load_state_dict(fused.state_dict())
    cfg = fused.config
    shape = (args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    sched = DDPMScheduler(num_train_timesteps=args.steps)
    impls = [i for i in args.impls.split(",") if i and (not i.endswith("+graphs") or device == "cuda")]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    print(f"DDPM sampling, {args.config} U-Net ({sum(p.numel() for p in fused.parameters()) / 1e6:.1f}M params), "
          f"{args.batch} images x {args.steps} steps, {str(dtype).replace('torch.', '')} on {device}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, "
          f"genkern backend {genkern.backends(device)}", flush=True)
    flops = network_flops(args.config, shape)
    print(f"network: {flops / args.batch / 1e9:.2f} GFLOP per image, {flops / 1e12:.3g} TFLOP per step; "
          f"15 images/s (the DDPM paper's TPU v3-8) needs {15 / args.batch * flops / 1e12:.3g} TFLOP/s", flush=True)

    networks = {}

    def network(name):
        """The model a genkern contender calls, built (compiled, captured) on first use: in the warm-up run."""
        if name not in networks:
            base = fused
            if "+compile" in name:
                if "compiled" not in networks:  # one compiled module for both compile contenders
                    networks["compiled"] = torch.compile(fused, fullgraph=True)
                base = networks["compiled"]
            networks[name] = GraphedModel(base, shape, device, dtype, fmt) if name.endswith("+graphs") else base
        return networks[name]

    def run(name, scheduler):
        if name == "eager":
            return eager_sample(eager, scheduler, shape, device, dtype, seed=1, memory_format=fmt)
        return sample(network(name), scheduler, shape, seed=1, device=device, dtype=dtype, memory_format=fmt,
                      progress=False)

    results = {}

    def write_json(critic, complete):
        """Rewritten after each contender, so that a run cut short (a lease's deadline) keeps what it timed."""
        if not args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(config=args.config, batch=args.batch, steps=args.steps, dtype=str(dtype), device=device,
                           network_flops_per_step=flops,
                           memory_format="channels_last" if args.channels_last else "contiguous",
                           cudnn_benchmark=args.cudnn_benchmark if device == "cuda" else None,
                           device_name=device_name(device), date=datetime.date.today().isoformat(),
                           cpu_isa=genkern._extension.BUILD_INFO.get("cpu_isa"), torch=torch.__version__,
                           complete=complete, results=results, critic_step=critic), f, indent=1)

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
            tflops = flops * args.steps / dt / 1e12
            results[name] = dict(seconds=dt, images_per_s=args.batch / dt, ms_per_step=dt / args.steps * 1e3,
                                 network_tflops_per_s=tflops, finite=ok)
            print(f"{name:22s} {dt:8.2f} s  {args.batch / dt:8.1f} images/s  {dt / args.steps * 1e3:7.2f} ms/step"
                  f"  {tflops:7.2f} TFLOP/s{'' if ok else '  NON-FINITE OUTPUT'}", flush=True)
            if args.profile:  # right after its run, so that a run cut short by a time limit keeps it
                one = DDPMScheduler(num_train_timesteps=args.steps)
                one.set_timesteps(1)
                results[name]["profile_ms_one_step"] = profile_summary(lambda n=name: run(n, one), device,
                                                                       f"one sampling step, {name}")
            write_json(None, complete=False)
    critic = critic_step_bench(device, dtype, args.critic_batch, args.critic_config, 10, args.profile, fmt) \
        if args.critic else None
    base = results.get("eager", {}).get("seconds")
    if base:
        for name, r in results.items():
            r["speedup_vs_eager"] = base / r["seconds"]
        print("speedup vs eager: " + ", ".join(f"{n} {r['speedup_vs_eager']:.2f}x" for n, r in results.items()))
    write_json(critic, complete=True)

if __name__ == "__main__":
    main()
