"""models.quality: the digits' sample-quality figures are the formulas they claim and tell real digits
from what is not."""
import argparse
import json

import pytest
import torch

pytest.importorskip("sklearn")
scipy_linalg = pytest.importorskip("scipy.linalg")

from models import data, quality  # noqa: E402


def random_spd(n, g):
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_frechet_distance_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 64):
        mu1, mu2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        s1, s2 = random_spd(n, g), random_spd(n, g)
        cross = scipy_linalg.sqrtm((s1 @ s2).numpy()).real.trace()
        want = ((mu1 - mu2) ** 2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * cross
        assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert quality.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_features_are_8x8_area_means_in_unit_range():
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    want = (x.reshape(3, 8, 2, 8, 2).mean((2, 4)).reshape(3, 64) + 1) / 2
    torch.testing.assert_close(quality.features(x), want, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="multiple of 8"):
        quality.features(torch.zeros(2, 1, 12, 12))
    with pytest.raises(ValueError, match="one per image"):
        quality.evaluate(torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.int64))


def test_figures_tell_real_digits_from_noise_and_wrong_labels():
    x, y = data.digits(16)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    other = perm[quality.HELD_OUT:quality.HELD_OUT + 400]  # real digits the figures compare with held-out ones
    real = quality.evaluate(x[other], y[other])
    assert real.real_label_accuracy > 0.9 and real.label_accuracy > 0.9
    assert real.frechet < 2 * real.real_frechet
    noise = quality.evaluate(torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1, y[other])
    assert noise.label_accuracy < 0.3 and noise.frechet > 20 * noise.real_frechet
    assert quality.evaluate(x[other], (y[other] + 1) % 10).label_accuracy < 0.1


def test_balanced_labels():
    assert torch.equal(quality.balanced_labels(20), torch.arange(10).repeat_interleave(2))
    labels = quality.balanced_labels(37)
    counts = torch.bincount(labels, minlength=10)
    assert labels.shape == (37,) and torch.equal(labels, labels.sort().values) and counts.max() - counts.min() <= 1


def test_ddpm_evaluate_scores_the_samples_the_sampler_draws(tmp_path):
    from models.ddpm import main, sample

    main(["train", "--steps", "2", "--batch", "4", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    ckpt, out = str(tmp_path / "ckpt.pt"), tmp_path / "q.json"
    main(["evaluate", "--ckpt", ckpt, "--n", "20", "--steps", "3", "--seed", "7", "--quiet", "--device", "cpu",
          "--out", str(out)])
    got = json.loads(out.read_text())
    x = sample(argparse.Namespace(ckpt=ckpt, out=str(tmp_path / "s.png"), sampler="ddim", steps=3, eta=0.0,
                                  labels="all", n=2, guidance=2.0, no_ema=False, inpaint=False, seed=7,
                                  device="cpu", quiet=True))
    want = quality.evaluate(x, quality.balanced_labels(20))
    assert got["n"] == 20 and got["ddim_steps"] == 3
    for k in ("label_accuracy", "real_label_accuracy", "frechet", "real_frechet"):
        assert got[k] == pytest.approx(getattr(want, k), rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("model, train_args, conditional", [
    ("progan", ["--steps", "2", "--batch", "4", "--phase", "1"], False),
    ("dcgan", ["--steps", "2", "--batch", "8", "--conditional"], True),
    ("vae", ["--steps", "2", "--batch", "8"], False),
])
def test_gan_and_vae_evaluate(tmp_path, model, train_args, conditional):
    import importlib
    main = importlib.import_module(f"models.{model}").main
    main(["train", *train_args, "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    out = tmp_path / "q.json"
    main(["evaluate", "--ckpt", str(tmp_path / "ckpt.pt"), "--n", "30", "--quiet", "--device", "cpu", "--out", str(out)])
    got = json.loads(out.read_text())
    # the floor depends only on n: any 30 images give it
    floor = quality.evaluate(torch.zeros(30, 1, 16, 16).uniform_(-1, 1)).real_frechet
    assert got["n"] == 30 and got["real_frechet"] == pytest.approx(floor, rel=1e-12)
    assert 0 <= got["frechet"] < float("inf")
    assert (got["label_accuracy"] is not None) == conditional and (got["real_label_accuracy"] is not None) == conditional
