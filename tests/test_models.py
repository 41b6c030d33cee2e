"""Reference models: the fused and eager builds of the same weights agree (outputs and gradients)."""
import pytest
import torch

from models.unet import UNet, timestep_embedding

from _util import assert_close


def test_unet_cifar10_has_the_papers_size():
    n = sum(p.numel() for p in UNet("cifar10").parameters())
    assert abs(n / 1e6 - 35.7) < 0.1, n  # Ho et al. 2020, appendix B: 35.7M


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    e = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(4) / 3)
    ref = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
    torch.testing.assert_close(e.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_unet_fused_equals_eager(channels_last):
    torch.manual_seed(0)
    fused = UNet("digits", fused=True, dropout=0.0)
    eager = UNet("digits", fused=False, dropout=0.0)
    eager.load_state_dict(fused.state_dict())  # same keys in both builds
    x = torch.randn(3, 1, 16, 16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t, y = torch.tensor([3, 500, 999]), torch.tensor([1, 4, 10])  # 10 = the null label
    a, b = fused(x, t, y), eager(x, t, y)
    assert_close(a, b.double(), torch.float32, "unet output", scale=b.abs().max().item())
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, f"grad {name}", scale=q.grad.abs().max().item())


# ---- data, EMA, training and sampling entry points (models/data.py, models/ema.py, models/ddpm.py) ----

def test_digits_dataset_is_real_and_scaled():
    from sklearn.datasets import load_digits

    from models.data import digits

    x, y = digits(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    orig = torch.tensor(load_digits().images, dtype=torch.float64) / 8 - 1  # pixel values 0..16
    assert torch.equal(digits(8)[0][:, 0].double(), orig)
    # the 16x16 images are the 8x8 ones upscaled: averaging 2x2 blocks gives back (blurred) originals
    down = torch.nn.functional.avg_pool2d(x.double(), 2)[:, 0]
    assert torch.corrcoef(torch.stack([down.flatten(), orig.flatten()]))[0, 1].item() > 0.95
    assert torch.equal(y[:10], torch.arange(10))


def test_missing_local_dataset_says_so(tmp_path):
    from models.data import load

    with pytest.raises(RuntimeError, match="nothing is downloaded"):
        load(f"cifar10:{tmp_path}", 32, 3)
    with pytest.raises(ValueError, match="digits"):
        load("mnist", 16, 1)


def test_ema_follows_its_formula():
    from models.ema import EMA

    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # first update: decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.model.weight, d * w0 + (1 - d) * (w0 + 1))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    from genkern.diffusion import DDPMScheduler

    torch.manual_seed(0)
    model = UNet("digits", dropout=0.0)
    x0 = torch.randn(8, 1, 16, 16).clamp(-1, 1)
    t, noise, labels = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 16, 16), torch.randint(0, 11, (8,))
    xt = DDPMScheduler().add_noise(x0, noise, t)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = lambda: torch.nn.functional.mse_loss(model(xt, t, labels), noise)  # noqa: E731
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_train_is_seeded_and_resumable(tmp_path):
    from models.ddpm import main

    a, b = tmp_path / "a", tmp_path / "b"
    main(["train", "--steps", "3", "--batch", "8", "--out", str(a), "--quiet", "--device", "cpu"])
    main(["train", "--steps", "2", "--batch", "8", "--out", str(b), "--quiet", "--device", "cpu"])
    main(["train", "--steps", "3", "--batch", "8", "--out", str(b), "--quiet", "--device", "cpu", "--resume"])
    sa, sb = (torch.load(p / "ckpt.pt", weights_only=False) for p in (a, b))
    assert sa["step"] == sb["step"] == 3
    for k in sa["model"]:  # 3 steps in one go == 2 steps, then 1 resumed: same batches, same weights
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=0, atol=0)
        torch.testing.assert_close(sa["ema"]["model"][k], sb["ema"]["model"][k], rtol=0, atol=0)


def test_sample_shapes_and_seed(tmp_path):
    from models.ddpm import main, sample
    import argparse

    main(["train", "--steps", "1", "--batch", "4", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    common = dict(ckpt=str(tmp_path / "ckpt.pt"), steps=4, eta=0.0, labels="1,7", n=3, guidance=2.0,
                  no_ema=False, device="cpu", quiet=True)
    args = lambda **kw: argparse.Namespace(**{**common, **kw})  # noqa: E731
    x1 = sample(args(out=str(tmp_path / "a.png"), sampler="ddim", inpaint=False, seed=5))
    x2 = sample(args(out=str(tmp_path / "b.png"), sampler="ddim", inpaint=False, seed=5))
    x3 = sample(args(out=str(tmp_path / "c.png"), sampler="ddpm", inpaint=False, seed=6))
    assert x1.shape == (6, 1, 16, 16) and torch.isfinite(x1).all()
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    x4 = sample(args(out=str(tmp_path / "d.png"), sampler="ddpm", inpaint=True, seed=5))
    assert x4.shape == (3, 1, 16, 16) and (tmp_path / "d.png").stat().st_size > 0
