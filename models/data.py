"""Training images for the reference models, never downloaded at run time.

* ``digits`` (default): scikit-learn's handwritten digits (1797 8x8 images, 10 classes; the data
  file ships inside scikit-learn), upscaled bilinearly to 16x16 or 32x32.
* ``cifar10:DIR``: torchvision's CIFAR-10 from DIR when its files are already there.
* ``folder:DIR``: any ImageFolder tree (one subfolder per class), resized to the model's size.

Every dataset comes as (images in [-1, 1], float32 [N, C, S, S]; integer labels [N]) held in memory.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as [1797, 1, size, size] in [-1, 1] (ink bright), and labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the digits dataset needs scikit-learn (pip install scikit-learn); "
                           "it ships the images, nothing is downloaded") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(d.target, dtype=torch.int64)


def _missing(what: str, where: str, how: str) -> RuntimeError:
    return RuntimeError(f"{what} not found at {where!r}: {how} (nothing is downloaded at run time)")


def cifar10(root: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(root, train=True, download=False)
    except RuntimeError as e:
        raise _missing("CIFAR-10", root, "put the extracted cifar-10-batches-py folder there") from e
    x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1, torch.tensor(ds.targets, dtype=torch.int64)


def image_folder(root: str, size: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision
    from torchvision import transforms as T
    if not os.path.isdir(root):
        raise _missing("image folder", root, "give a directory with one subfolder of images per class")
    tf = [T.Resize(size), T.CenterCrop(size)] + ([T.Grayscale()] if channels == 1 else []) + [T.ToTensor()]
    ds = torchvision.datasets.ImageFolder(root, transform=T.Compose(tf))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs) * 2 - 1, torch.tensor(ys, dtype=torch.int64)


def load(spec: str, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``digits`` | ``cifar10:DIR`` | ``folder:DIR`` -> (images [N, channels, size, size], labels)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        x, y = digits(size)
    elif kind == "cifar10":
        x, y = cifar10(arg or "data/cifar10", size)
    elif kind == "folder":
        x, y = image_folder(arg, size, channels)
    else:
        raise ValueError(f"data must be 'digits', 'cifar10:DIR' or 'folder:DIR', got {spec!r}")
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1).contiguous()
    return x, y
