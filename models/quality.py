"""Sample quality of the digits models, with nothing downloaded: real digits judge generated ones.

scikit-learn's 1797 digits are split once (seeded) into 1297 to fit on and 500 held out. Images of any
size in [-1, 1] are compared as 8x8 (2x2 area means of the models' 16x16, the digits' native size),
through the same `features` for real and generated images. Two figures, each beside what the held-out
real digits score (the ceiling a perfect generator reaches, up to sampling noise):

* **label accuracy**: the share of class-conditional samples that a classifier fitted on the real
  digits puts in the class they were drawn for. It needs samples that are both digit-like and on their
  label (classifier-free guidance); chance is 10%. The classifier is multinomial logistic regression
  on the 64 pixels (scikit-learn), ~96% on the held-out digits.
* **Fréchet distance** between the Gaussians fitted to generated and to held-out real features,
  ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``: the formula of the FID (Heusel et al.,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017),
  here on the 64 pixels instead of Inception features, which would need downloaded weights. The
  floor is as many of the fitted digits as there are samples (at most 1297) against the held-out ones:
  the estimator's own bias at that sample size, on real data.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import data

HELD_OUT = 500


def features(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, S, S] images in [-1, 1] (S a multiple of 8) -> [N, 64] float64 in [0, 1]: 8x8 area means."""
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[-1] % 8 or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"features: images must be [N, 1, S, S] with S a multiple of 8, got {tuple(images.shape)}")
    x = F.adaptive_avg_pool2d(images.detach().double().cpu(), 8)
    return ((x.flatten(1) + 1) / 2).clamp(0, 1)


@lru_cache(maxsize=None)
def real_split(size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit features, fit labels, held-out features, held-out labels) of the real digits at `size`."""
    x, y = data.digits(size)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    fit, held = perm[HELD_OUT:], perm[:HELD_OUT]
    f = features(x)
    return f[fit], y[fit], f[held], y[held]


@lru_cache(maxsize=None)
def _classifier(size: int):
    from sklearn.linear_model import LogisticRegression
    f_fit, y_fit, _, _ = real_split(size)
    return LogisticRegression(max_iter=2000, C=1.0).fit(f_fit.numpy(), y_fit.numpy())


def label_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` the real-digit classifier assigns to their `labels`."""
    pred = _classifier(images.shape[-1]).predict(features(images).numpy())
    return float((torch.from_numpy(pred) == labels.cpu()).double().mean())


def gaussian_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of the rows of f, float64."""
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)) for covariances s1, s2 (symmetric PSD).
    tr((s1 s2)^(1/2)) is taken as tr((r s2 r)^(1/2)) with r = s1^(1/2): the same eigenvalues, from a
    symmetric matrix (eigh), where a general matrix square root of s1 s2 picks up rounding's imaginary parts."""
    r = _psd_sqrt(s1.double())
    cross = torch.linalg.eigvalsh(r @ s2.double() @ r).clamp(min=0).sqrt().sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross))  # >= 0 but for rounding


@dataclass
class Quality:
    label_accuracy: float       # generated samples on their label (chance 0.1)
    real_label_accuracy: float  # the held-out digits on theirs: the ceiling
    frechet: float              # generated vs held-out real
    real_frechet: float         # as many fitted real digits vs the held-out ones: the floor
    n: int

    def __str__(self) -> str:
        return (f"label accuracy {100 * self.label_accuracy:.1f}% (held-out real digits {100 * self.real_label_accuracy:.1f}%, "
                f"chance 10%); Frechet distance on 8x8 pixels {self.frechet:.3f} (held-out real digits "
                f"{self.real_frechet:.3f}); {self.n} samples")


def evaluate(images: torch.Tensor, labels: torch.Tensor) -> Quality:
    """Both figures for class-conditional samples `images` ([N, 1, S, S] in [-1, 1]) drawn for `labels`."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"evaluate: labels must be [{images.shape[0]}] (one per image), got {tuple(labels.shape)}")
    f_fit, _, f_held, y_held = real_split(images.shape[-1])
    held = gaussian_stats(f_held)
    n = min(images.shape[0], f_fit.shape[0])
    f_real = f_fit[torch.randperm(f_fit.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    real_acc = float((torch.from_numpy(_classifier(images.shape[-1]).predict(f_held.numpy())) == y_held).double().mean())
    return Quality(label_accuracy(images, labels), real_acc, frechet_distance(*gaussian_stats(features(images)), *held),
                   frechet_distance(*gaussian_stats(f_real), *held), images.shape[0])
