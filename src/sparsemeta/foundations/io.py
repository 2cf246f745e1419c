"""Plain files of run directories: JSON and tensor files, written atomically, read safely.

Tensor files are read with ``weights_only=True``: a checkpoint is data (tensors, numbers, lists,
dicts), so resuming a run directory someone else wrote can never execute code from its pickle.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparsemeta.foundations.atomic import atomic_write, atomic_write_text
from sparsemeta.foundations.errors import UserError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_tensors(path: str | Path, device: torch.device | str = "cpu") -> Any:
    """A tensor file of ours (weights, masks, checkpoints) as data only, never code; a missing,
    truncated or foreign file is one UserError naming it."""
    if Path(path).exists() and not Path(path).is_file():  # a device or fifo is never a tensor file
        raise UserError(f"'{path}' is not a regular file; restore the run directory's file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except PermissionError:
        raise  # the CLI names the file and what to fix
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing; the run directory is incomplete (restore it, or "
                        "use another --out to start over)") from None
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"'{path}' is damaged or not a sparsemeta tensor file "
                        f"({type(exc).__name__}: {first}); restore it, or delete it to redo "
                        "that step") from None


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

