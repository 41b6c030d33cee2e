"""ProGAN, DCGAN and the VAE (models/): fused and eager builds of the same weights agree, a training
step lowers the loss on a fixed batch, and the entry points sample reproducibly."""
import argparse
import copy

import pytest
import torch

import genkern
from models import dcgan, progan, vae

from _util import assert_close


def close(a, b, what, scale=None):
    assert_close(a, b.double(), torch.float32, what, scale=b.abs().max().item() if scale is None else scale)


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        close(ga[n], gb[n], f"grad {n}")


# ---- ProGAN ----------------------------------------------------------------------------------------

def test_progan_schedule_grows_and_fades():
    # stage 0 for a phase, then per stage: a fade-in (alpha 0 -> 1) and a stable phase; the last stays
    got = [progan.schedule(s, 3, 4) for s in range(24)]
    assert got[:4] == [(0, 1.0)] * 4
    assert got[4:8] == [(1, 0.0), (1, 0.25), (1, 0.5), (1, 0.75)] and got[8:12] == [(1, 1.0)] * 4
    assert got[12:16] == [(2, 0.0), (2, 0.25), (2, 0.5), (2, 0.75)] and got[16:] == [(2, 1.0)] * 8


@pytest.mark.parametrize("stage,alpha", [(0, 1.0), (1, 0.3), (2, 1.0)])
def test_progan_fused_equals_eager(stage, alpha):
    torch.manual_seed(0)
    Gf, Df = progan.Generator("digits", fused=True), progan.Discriminator("digits", fused=True)
    Ge, De = progan.Generator("digits", fused=False), progan.Discriminator("digits", fused=False)
    Ge.load_state_dict(Gf.state_dict())
    De.load_state_dict(Df.state_dict())
    z = torch.randn(8, Gf.latent)
    real = progan.real_at(torch.rand(8, 1, 16, 16) * 2 - 1, stage, alpha)
    assert real.shape[-1] == 4 * 2 ** stage
    xf, xe = Gf(z, stage, alpha), Ge(z, stage, alpha)
    close(xf, xe, "G(z)")
    lf = progan.critic_loss(Gf, Df, real, z, stage, alpha, fused=True, generator=torch.Generator().manual_seed(1))
    le = progan.critic_loss(Ge, De, real, z, stage, alpha, fused=False, generator=torch.Generator().manual_seed(1))
    close(lf, le, "critic loss", scale=1.0)
    lf.backward()
    le.backward()
    assert_same_grads(Df, De)  # through the penalty's double backward: pixel norm, mbstd, the fused penalty


def test_progan_critic_step_lowers_its_loss():
    torch.manual_seed(0)
    G, D = progan.Generator("digits"), progan.Discriminator("digits")
    z, real = torch.randn(16, G.latent), torch.rand(16, 1, 16, 16) * 2 - 1
    loss = lambda: progan.critic_loss(G, D, real, z, 2, 1.0, True, generator=torch.Generator().manual_seed(3))  # noqa
    opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.0, 0.99))
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_progan_train_resumes_exactly_and_samples_reproducibly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["train", "--batch", "8", "--phase", "1", "--quiet", "--device", "cpu"]
    progan.main(base + ["--steps", "4", "--out", str(a)])
    progan.main(base + ["--steps", "2", "--out", str(b)])
    progan.main(base + ["--steps", "4", "--out", str(b), "--resume"])
    sa, sb = (torch.load(p / "ckpt.pt", weights_only=False) for p in (a, b))
    for k in sa["G"]:
        torch.testing.assert_close(sa["G"][k], sb["G"][k], rtol=0, atol=0)
    args = argparse.Namespace(ckpt=str(a / "ckpt.pt"), out=str(tmp_path / "s.png"), seed=4, device="cpu", n=4,
                              quiet=True)
    x1, x2 = progan.sample(args), progan.sample(args)
    assert x1.shape == (4 * 4 + 4, 1, 16, 16) and torch.equal(x1, x2)


# ---- DCGAN -----------------------------------------------------------------------------------------

def test_dcgan_shapes_and_conditioning():
    G, D = dcgan.Generator("digits", conditional=True), dcgan.Discriminator("digits", conditional=True)
    z, y = torch.randn(4, G.latent), torch.tensor([0, 3, 3, 9])
    x = G(z, y)
    assert x.shape == (4, 1, 16, 16) and x.abs().max() <= 1
    assert D(x, y).shape == (4,)
    G.eval()
    assert not torch.allclose(G(z, y), G(z, torch.tensor([1, 1, 1, 1]))), "the label must change the image"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dcgan.Discriminator(critic=True).modules())


def test_dcgan_wgan_gp_fused_penalty_equals_eager():
    torch.manual_seed(0)
    G, D = dcgan.Generator("digits"), dcgan.Discriminator("digits", critic=True)
    D2 = copy.deepcopy(D)
    real, z = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, G.latent)
    lf = dcgan.discriminator_loss(G, D, real, None, z, "wgan-gp", True, generator=torch.Generator().manual_seed(2))
    le = dcgan.discriminator_loss(G, D2, real, None, z, "wgan-gp", False, generator=torch.Generator().manual_seed(2))
    close(lf, le, "critic loss", scale=1.0)
    lf.backward()
    le.backward()
    assert_same_grads(D, D2)


@pytest.mark.parametrize("loss", ["gan", "wgan-gp"])
def test_dcgan_discriminator_step_lowers_its_loss(loss):
    torch.manual_seed(0)
    G, D = dcgan.Generator("digits"), dcgan.Discriminator("digits", critic=loss == "wgan-gp")
    G.apply(dcgan.init_weights)
    D.apply(dcgan.init_weights)
    real, z = torch.rand(16, 1, 16, 16) * 2 - 1, torch.randn(16, G.latent)
    f = lambda: dcgan.discriminator_loss(G, D, real, None, z, loss, True, generator=torch.Generator().manual_seed(5))  # noqa
    opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
    before = f()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert f().item() < before.item()


def test_dcgan_entry_points(tmp_path):
    dcgan.main(["train", "--steps", "2", "--batch", "8", "--conditional", "--out", str(tmp_path), "--quiet",
                "--device", "cpu"])
    args = argparse.Namespace(ckpt=str(tmp_path / "ckpt.pt"), out=str(tmp_path / "s.png"), seed=1, device="cpu",
                              n=3, quiet=True)
    x1, x2 = dcgan.sample(args), dcgan.sample(args)
    assert x1.shape == (10 * 3 + 3, 1, 16, 16) and torch.equal(x1, x2)


# ---- VAE -------------------------------------------------------------------------------------------

def test_vae_fused_equals_eager_and_patch_converts():
    torch.manual_seed(0)
    fused, eager = vae.VAE("digits", fused=True), vae.VAE("digits", fused=False)
    eager.load_state_dict(fused.state_dict())
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    outs = []
    for m in (fused, eager):
        recon, mu, logvar = m(x, generator=torch.Generator().manual_seed(0))
        loss, _ = vae.elbo_loss(x, recon, mu, logvar)
        loss.backward()
        outs.append((recon, mu, loss))
    for a, b, what in zip(outs[0], outs[1], ["recon", "mu", "loss"]):
        close(a, b, what)
    assert_same_grads(fused, eager)
    patched = copy.deepcopy(eager)
    report = genkern.patch(patched)
    assert len(report) == sum(isinstance(m, torch.nn.GroupNorm) for m in eager.modules())
    with torch.no_grad():
        close(patched.encode(x)[0], eager.encode(x)[0], "patched encoder")


def test_elbo_matches_torch_distributions():
    D = torch.distributions
    torch.manual_seed(0)
    x, recon = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mu, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    loss, parts = vae.elbo_loss(x, recon, mu, logvar, sigma=0.5, beta=1.0)
    # the reconstruction term is the Gaussian NLL per image without its constant 16 (log sigma + log(2 pi) / 2)
    nll = -D.Normal(recon.double(), 0.5).log_prob(x.double()).sum() / 3
    const = 16 * (torch.log(torch.tensor(0.5, dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    assert abs(parts["rec"] - (nll - const).item()) < 1e-3
    kl = D.kl_divergence(D.Normal(mu.double(), (0.5 * logvar.double()).exp()), D.Normal(0.0, 1.0)).sum() / 3
    assert abs(parts["kl"] - kl.item()) < 1e-3
    assert abs(loss.item() - parts["rec"] - parts["kl"]) < 1e-3


def test_vae_step_lowers_the_loss_and_sampling_interpolates(tmp_path):
    torch.manual_seed(0)
    model = vae.VAE("digits")
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    f = lambda: vae.elbo_loss(x, *model(x, generator=torch.Generator().manual_seed(7)))[0]  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    before = f()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert f().item() < before.item()
    vae.main(["train", "--steps", "2", "--batch", "8", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    args = argparse.Namespace(ckpt=str(tmp_path / "ckpt.pt"), out=str(tmp_path / "s.png"), seed=2, device="cpu",
                              n=4, quiet=True)
    x1, x2 = vae.sample(args), vae.sample(args)
    assert x1.shape == (4 * 4 + 4, 1, 16, 16) and torch.equal(x1, x2)
