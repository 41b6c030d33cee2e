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
