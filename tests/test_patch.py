"""genkern.patch: fused GroupNorm+SiLU put into other people's models keeps outputs and gradients."""
import copy

import pytest
import torch
from torch import nn

import genkern
from _util import assert_close


def outputs_and_grads(model, *inputs):
    model.zero_grad(set_to_none=True)
    y = model(*inputs)
    y = y.sample if hasattr(y, "sample") else y
    (y.double() ** 2).mean().backward()
    return y.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_model_outputs(eager, patched, *inputs, tol_scale=1.0):
    ye, ge = outputs_and_grads(eager, *inputs)
    yp, gp = outputs_and_grads(patched, *inputs)
    assert_close(yp, ye.double(), torch.float32, "output", scale=tol_scale * ye.abs().max().item())
    assert ge.keys() == gp.keys()
    for n in ge:
        assert_close(gp[n], ge[n].double(), torch.float32, f"grad {n}", scale=tol_scale * ge[n].abs().max().item())


def test_sequential_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU(),
        nn.Sequential(nn.GroupNorm(8, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)),
        nn.GroupNorm(2, 4), nn.ReLU(),  # not a supported activation: left alone
    )
    eager = copy.deepcopy(model)
    keys = list(model.state_dict().keys())
    report = genkern.patch(model)
    assert len(report) == 3, str(report)
    assert isinstance(model[1], genkern.nn.GroupNormSiLU) and isinstance(model[2], nn.Identity)
    assert model[4].activation == "gelu" and isinstance(model[6][0], genkern.nn.GroupNormSiLU)
    assert type(model[7]) is nn.GroupNorm and isinstance(model[8], nn.ReLU)
    assert list(model.state_dict().keys()) == keys
    x = torch.randn(2, 3, 8, 8)
    assert_same_model_outputs(eager, model, x)
    assert len(genkern.patch(model)) == 0, "a second patch must find nothing left to do"


def test_parameters_are_shared_not_copied():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    w = model[0].weight
    genkern.patch(model)
    assert model[0].weight is w


def test_package_unet_blocks():
    from models.unet import UNet

    torch.manual_seed(0)
    eager = UNet("digits", fused=False).eval()
    model = copy.deepcopy(eager)
    report = genkern.patch(model)
    n_norms = sum(1 for m in eager.modules() if type(m).__name__ == "NormAct")
    assert len(report) == n_norms, str(report)
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert_same_model_outputs(eager, model, x, t, labels)


def diffusers_cifar10_unet(**overrides):
    diffusers = pytest.importorskip("diffusers")
    # the google/ddpm-cifar10-32 architecture (its config.json), random weights: nothing downloaded
    config = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32, norm_eps=1e-6, act_fn="silu", time_embedding_type="positional",
                  flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, center_input_sample=False)
    config.update(overrides)
    return diffusers.UNet2DModel(**config)


def test_diffusers_unet2d_cifar10():
    torch.manual_seed(0)
    eager = diffusers_cifar10_unet()
    model = copy.deepcopy(eager)
    report = genkern.patch(model)
    n_resnets = sum(1 for m in eager.modules() if type(m).__name__ == "ResnetBlock2D")
    assert len(report) == n_resnets + 1 and not report.skipped, str(report)  # + the output head
    assert isinstance(model.conv_norm_out, genkern.nn.GroupNormSiLU) and isinstance(model.conv_act, nn.Identity)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    # a 35.7M-parameter network: float32 rounding of the fused and eager norms compounds over 30 layers
    assert_same_model_outputs(eager, model, x, t, tol_scale=5.0)


def test_diffusers_unet2d_compiles():
    torch.manual_seed(0)
    model = diffusers_cifar10_unet(block_out_channels=(32, 64), norm_num_groups=8,
                                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), sample_size=16)
    eager = copy.deepcopy(model)
    genkern.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert_close(compiled(x, t).sample, eager(x, t).sample.double(), torch.float32, "compiled output")


def test_scale_shift_resnet_is_reported_not_patched():
    diffusers = pytest.importorskip("diffusers")
    block = diffusers.models.resnet.ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4,
                                                  time_embedding_norm="scale_shift")
    report = genkern.patch(block)
    assert len(report) == 0 and "scale_shift" in report.skipped[0]
    assert type(block.norm1) is nn.GroupNorm


def test_diffusers_unet2d_condition():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    eager = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    model = copy.deepcopy(eager)
    report = genkern.patch(model)
    n_resnets = sum(1 for m in eager.modules() if type(m).__name__ == "ResnetBlock2D")
    assert len(report) == n_resnets + 1 and not report.skipped, str(report)
    assert any("UNet2DConditionModel.conv_norm_out+conv_act" in r for r in report.replaced), str(report)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    assert_same_model_outputs(eager, model, x, t, text)


def test_diffusers_autoencoder_kl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    eager = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                    layers_per_block=1, norm_num_groups=8)
    model = copy.deepcopy(eager)
    report = genkern.patch(model)
    n_resnets = sum(1 for m in eager.modules() if type(m).__name__ == "ResnetBlock2D")
    assert len(report) == n_resnets + 2 and not report.skipped, str(report)  # + encoder and decoder heads
    for part in (model.encoder, model.decoder):
        assert isinstance(part.conv_norm_out, genkern.nn.GroupNormSiLU) and isinstance(part.conv_act, nn.Identity)

    def forward(vae, x):  # deterministic: the posterior's mean, no sampling
        return vae.decode(vae.encode(x).latent_dist.mode()).sample
    x = torch.randn(2, 3, 16, 16)
    ye, yp = forward(eager, x), forward(model, x)
    assert_close(yp, ye.double(), torch.float32, "reconstruction", scale=ye.abs().max().item())
    (forward(eager, x).double() ** 2).mean().backward()
    (forward(model, x).double() ** 2).mean().backward()
    for (n, pe), (_, pp) in zip(eager.named_parameters(), model.named_parameters()):
        assert_close(pp.grad, pe.grad.double(), torch.float32, f"grad {n}", scale=pe.grad.abs().max().item())


def test_unchecked_diffusers_output_head_is_reported_not_patched():
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    # the MoVQ decoder's head is a SpatialNorm (conditioned on the latent), not a GroupNorm
    decoder = vae.Decoder(in_channels=4, out_channels=3, block_out_channels=(32,),
                                                        norm_num_groups=8, norm_type="spatial")
    report = genkern.patch(decoder)
    assert not isinstance(decoder.conv_norm_out, genkern.nn.GroupNormSiLU) and type(decoder.conv_act) is nn.SiLU
    assert any("conv_norm_out is SpatialNorm" in s for s in report.skipped), str(report)
    # a class with the same attribute names whose forward genkern has not read
    Unknown = type("UNetSomethingNew", (nn.Module,), {"__module__": "diffusers.models.unets.new"})
    m = Unknown()
    m.conv_norm_out, m.conv_act = nn.GroupNorm(2, 4), nn.SiLU()
    report = genkern.patch(m)
    assert len(report) == 0 and "has not checked" in report.skipped[0] and type(m.conv_norm_out) is nn.GroupNorm
