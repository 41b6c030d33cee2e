"""genkern.diffusion against diffusers' DDPMScheduler / DDIMScheduler on the same inputs and noise,
and the sampling loop: reproducibility, guidance, inpainting, callbacks."""
import math

import pytest
import torch

import genkern
from genkern.diffusion import DDIMScheduler, DDPMScheduler, sample
from _util import assert_close

diffusers = pytest.importorskip("diffusers")  # a dev dependency: installed by `make test`

PAIRS = [(DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)]


@pytest.mark.parametrize("cls,dcls", PAIRS, ids=["ddpm", "ddim"])
@pytest.mark.parametrize("config", [
    dict(),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample=False),
    dict(num_train_timesteps=500, steps_offset=1, clip_sample_range=2.0),
], ids=["default", "scaled-trailing", "cosine-linspace", "T500-offset"])
def test_tables_and_timesteps_match(cls, dcls, config):
    ours, ref = cls(**config), dcls(**config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for n in (1, 7, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()


def _run_both(ours, ref, steps, shape, step_kwargs, cfg=False, channels_last=False):
    """Step both schedulers along the same trajectory with the same model outputs and generator seeds."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    worst = 0.0
    for t in ref.timesteps.tolist():
        m = torch.randn(shape) * 1.3
        a = ours.step(m, t, x, generator=torch.Generator().manual_seed(1000 + t), **step_kwargs).prev_sample
        b = ref.step(m, t, x, generator=torch.Generator().manual_seed(1000 + t), **step_kwargs).prev_sample
        assert_close(a, b.double(), torch.float32, f"t={t}", scale=3.0)
        worst = max(worst, (a - b).abs().max().item())
        x = b
    return worst


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_ddpm_step_matches_diffusers(pred, variance_type, clip):
    cfg = dict(prediction_type=pred, variance_type=variance_type, clip_sample=clip)
    _run_both(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), 25, (2, 3, 8, 8), {})


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clipped_output", [False, True], ids=["model-eps", "clipped-eps"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(pred, eta, clipped_output, spacing):
    cfg = dict(prediction_type=pred, timestep_spacing=spacing)
    _run_both(DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), 20, (2, 3, 8, 8),
              dict(eta=eta, use_clipped_model_output=clipped_output))


def test_step_with_given_noise_matches_diffusers_variance_noise():
    ours, ref = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x, m, z = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    t = int(ref.timesteps[3])
    a = ours.step(m, t, x, eta=0.6, variance_noise=z).prev_sample
    b = ref.step(m, t, x, eta=0.6, variance_noise=z).prev_sample
    assert_close(a, b.double(), torch.float32, "variance_noise", scale=3.0)


def test_step_on_channels_last_and_full_train_schedule():
    """Without set_timesteps DDPM walks every training step, as diffusers does."""
    _run_both(DDPMScheduler(num_train_timesteps=40), diffusers.DDPMScheduler(num_train_timesteps=40), 40,
              (2, 3, 4, 4), {}, channels_last=True)


@pytest.mark.parametrize("cls,dcls", PAIRS, ids=["ddpm", "ddim"])
def test_add_noise_matches_diffusers(cls, dcls):
    ours, ref = cls(), dcls()
    x0, z = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 998, 999])
    assert_close(ours.add_noise(x0, z, t), ref.add_noise(x0, z, t).double(), torch.float32, "add_noise", scale=1)
    assert_close(ours.add_noise(x0, z, 321), ref.add_noise(x0, z, torch.tensor([321])).double(), torch.float32,
                 "add_noise, int timestep", scale=1)


def test_from_config_takes_a_diffusers_config():
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ours = DDIMScheduler.from_config(ref.config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.config.steps_offset == 1 and ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))
    ddpm = DDPMScheduler.from_config(dict(ref.config))  # another scheduler's keys are ignored
    assert ddpm.config.beta_schedule == "scaled_linear"
    _run_both(ours, ref, 10, (1, 4, 8, 8), dict(eta=0.0))


def test_scheduler_bad_inputs():
    s = DDPMScheduler()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="timestep must lie in"):
        s.step(x, 1000, x)
    with pytest.raises(ValueError, match="timestep must lie in"):
        s.step(x, -1, x)
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="x0")
    with pytest.raises(NotImplementedError, match="thresholding"):
        DDPMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="sigmoid")
    d = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(x, 10, x)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        d.step(x, 900, x, eta=-1.0)
    with pytest.raises(ValueError, match="at most one of noise, generator and seed"):
        d.step(x, 900, x, noise=x, seed=1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        d.set_timesteps(1001)


# --------------------------------------------------------------------------------------------------
# Sampling loop

class TinyEps(torch.nn.Module):
    """A deterministic stand-in for a U-Net: eps depends on x, t and the label."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(num_classes + 1, 3)

    def forward(self, x, t, y=None):
        h = self.conv(x) * torch.cos(t.float() / 1000).view(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y).view(-1, 3, 1, 1)
        return 0.1 * h


@pytest.mark.parametrize("sched", [DDPMScheduler, DDIMScheduler])
def test_same_seed_same_samples(sched):
    model = TinyEps()
    kw = dict(num_inference_steps=10, seed=1234, progress=False)
    with torch.no_grad():
        a = sample(model, sched(), (2, 3, 8, 8), **kw)
        b = sample(model, sched(), (2, 3, 8, 8), **kw)
        c = sample(model, sched(), (2, 3, 8, 8), **dict(kw, seed=1235))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_same_seed_same_samples_across_backends():
    model = TinyEps()
    outs = {}
    for b in genkern.backends("cpu"):
        with genkern.use_backend(b), torch.no_grad():
            outs[b] = sample(model, DDPMScheduler(), (1, 3, 4, 4), num_inference_steps=8, seed=5, progress=False)
    ref = outs.pop("reference")
    for b, o in outs.items():
        assert_close(o, ref.double(), torch.float32, f"{b} vs reference", scale=3.0)


def test_sampler_matches_diffusers_loop_with_cfg():
    """The whole loop with classifier-free guidance, against diffusers' scheduler driven the way
    its pipelines drive it (guidance applied to the chunked model output, then step)."""
    torch.manual_seed(0)
    model = TinyEps()
    w, labels, null = 3.0, torch.tensor([0, 2]), 3
    gen = torch.Generator().manual_seed(77)
    with torch.no_grad():
        ours = sample(model, DDIMScheduler(), (2, 3, 8, 8), num_inference_steps=12, class_labels=labels,
                      guidance_scale=w, null_label=null, eta=1.0, generator=gen, progress=False)
        ref_s = diffusers.DDIMScheduler()
        ref_s.set_timesteps(12)
        gen = torch.Generator().manual_seed(77)
        x = torch.randn((2, 3, 8, 8), generator=gen)
        y = torch.cat([torch.full_like(labels, null), labels])
        for t in ref_s.timesteps:
            out = model(torch.cat([x, x]), torch.full((4,), int(t)), y)
            u, c = out.chunk(2)
            x = ref_s.step(u + w * (c - u), t, x, eta=1.0, generator=gen).prev_sample
    assert_close(ours, x.double(), torch.float32, "CFG loop", scale=3.0)


def test_sampler_callback_progress_and_inpainting():
    model = TinyEps()
    known = torch.randn(1, 3, 6, 6).clamp(-1, 1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    seen = []
    with torch.no_grad():
        x = genkern.diffusion.DDPMSampler(model)((1, 3, 6, 6), num_inference_steps=10, seed=3, mask=mask,
                                                 known=known, progress=False,
                                                 callback=lambda i, t, x: seen.append((i, t)))
    assert [i for i, _ in seen] == list(range(10)) and seen[-1][1] == 0
    # at the last step alpha_bar_prev = 1: the known half is the known image exactly
    torch.testing.assert_close(x[..., :3], known[..., :3])
    assert not torch.allclose(x[..., 3:], known[..., 3:])


def test_sampler_channels_last():
    """memory_format=channels_last: the model sees channels-last x at every step and the loop returns it
    so. Noise drawn from a generator is the same logical tensor in either layout, so the samples are
    diffusers' loop's; in-kernel noise fills memory in order, so a seed gives other samples than in NCHW,
    the same on every backend."""
    torch.manual_seed(0)
    model = TinyEps()
    seen = []

    def spy(x, t):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return model(x, t)
    shape, cl = (2, 3, 6, 6), torch.channels_last
    with torch.no_grad():
        ours = sample(spy, DDPMScheduler(), shape, num_inference_steps=8, generator=torch.Generator().manual_seed(9),
                      memory_format=cl, progress=False)
        ref_s = diffusers.DDPMScheduler()
        ref_s.set_timesteps(8)
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(shape, generator=gen)
        for t in ref_s.timesteps:
            x = ref_s.step(model(x, torch.full((2,), int(t))), t, x, generator=gen).prev_sample
    assert seen == [True] * 8 and ours.is_contiguous(memory_format=cl)
    assert_close(ours, x.double(), torch.float32, "channels_last loop vs diffusers", scale=3.0)

    outs = {}
    for b in genkern.backends("cpu"):
        with genkern.use_backend(b), torch.no_grad():
            outs[b] = sample(model, DDPMScheduler(), shape, num_inference_steps=8, seed=5, memory_format=cl,
                             progress=False)
            assert outs[b].is_contiguous(memory_format=cl)
    ref = outs.pop("reference")
    for b, o in outs.items():
        assert_close(o, ref.double(), torch.float32, f"{b} vs reference, channels_last", scale=3.0)
    with torch.no_grad():
        nchw = sample(model, DDPMScheduler(), shape, num_inference_steps=8, seed=5, progress=False)
    assert not torch.allclose(ref, nchw, atol=1e-2)  # the noise follows memory order


def test_sampler_bad_inputs():
    with pytest.raises(TypeError, match="memory_format must be a torch.memory_format"):
        sample(TinyEps(), DDPMScheduler(), (1, 3, 4, 4), memory_format="channels_last", progress=False)
    with pytest.raises(ValueError, match="memory_format=torch.channels_last needs a 4-d shape"):
        sample(TinyEps(), DDPMScheduler(), (1, 3, 4), memory_format=torch.channels_last, progress=False)
    with pytest.raises(ValueError, match="null_label"):
        sample(TinyEps(), DDPMScheduler(), (1, 3, 4, 4), guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="DDIM needs num_inference_steps"):
        sample(TinyEps(), DDIMScheduler(), (1, 3, 4, 4), progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        sample(TinyEps(), DDPMScheduler(), (2, 3, 4, 4), num_inference_steps=2, class_labels=torch.tensor([1]),
               progress=False)
