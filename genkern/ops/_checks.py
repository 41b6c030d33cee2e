"""Argument checks shared by the ops' Python layers (the C++ ops' own: csrc/checks.h)."""
from __future__ import annotations

import torch


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """ValueError "op: name is on D but ref_name is on E" unless t is on ref's device. The kernels read every
    operand through a pointer of the call's device: one on another device would be a bad address or an
    error that names no argument."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
