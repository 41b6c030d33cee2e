"""Sample quality of the digits models (each model's ``evaluate`` command), with nothing downloaded:
real digits judge generated ones.

scikit-learn's 1797 digits are split once (seeded) into 1297 to fit on and 500 held out. Images of any
size in [-1, 1] are compared as 8x8 (2x2 area means of the models' 16x16, the digits' native size),
through the same `features` for real and generated images. Two figures, each beside what the held-out
real digits score (the ceiling a perfect generator reaches, up to sampling noise):

* **label accuracy** (class-conditional models only: the DDPM, the conditional DCGAN): the share of
  samples that a classifier fitted on the real digits puts in the class they were drawn for. It needs
  samples that are both digit-like and on their label; chance is 10%. The classifier is multinomial logistic regression
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
from typing import Optional

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


def _accuracy(f: torch.Tensor, labels: torch.Tensor, size: int) -> float:
    pred = _classifier(size).predict(f.numpy())
    return float((torch.from_numpy(pred) == labels.cpu()).double().mean())


def label_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` the real-digit classifier (fitted at their size) assigns to their `labels`."""
    return _accuracy(features(images), labels, images.shape[-1])


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
    frechet: float              # generated vs held-out real
    real_frechet: float         # as many fitted real digits vs the held-out ones: the floor
    n: int
    label_accuracy: Optional[float] = None       # class-conditional samples on their label (chance 0.1)
    real_label_accuracy: Optional[float] = None  # the held-out digits on theirs: the ceiling

    def __str__(self) -> str:
        text = (f"Frechet distance on 8x8 pixels {self.frechet:.3f} (held-out real digits {self.real_frechet:.3f}); "
                f"{self.n} samples")
        if self.label_accuracy is None:
            return text
        return (f"label accuracy {100 * self.label_accuracy:.1f}% (held-out real digits "
                f"{100 * self.real_label_accuracy:.1f}%, chance 10%); " + text)


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """n labels, each class in turn for n / num_classes consecutive samples (sorted, as evenly as n allows)."""
    return torch.arange(n) * num_classes // n


def evaluate(images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Quality:
    """The figures for samples `images` ([N, 1, S, S] in [-1, 1]); the label accuracy too where they
    were drawn class-conditionally for `labels`."""
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"evaluate: labels must be [{images.shape[0]}] (one per image), got {tuple(labels.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"evaluate: needs at least 2 images for a covariance, got {images.shape[0]}")
    f_fit, _, f_held, y_held = real_split(images.shape[-1])
    held = gaussian_stats(f_held)
    n = min(images.shape[0], f_fit.shape[0])
    f_real = f_fit[torch.randperm(f_fit.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    accuracies = () if labels is None else (label_accuracy(images, labels), _accuracy(f_held, y_held, images.shape[-1]))
    return Quality(frechet_distance(*gaussian_stats(features(images)), *held),
                   frechet_distance(*gaussian_stats(f_real), *held), images.shape[0], *accuracies)
