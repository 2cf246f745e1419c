"""The compute device a config names (``device: auto|cpu|cuda``)."""

from __future__ import annotations

import torch

from sparsemeta.foundations.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; set device to cpu or auto "
                        "(--set device=cpu; for a saved run, in its config.yaml)")
    return torch.device(name)
