"""Run directories: resolved config, metrics, checkpoints and results as plain files.

Every write is atomic (``sparsemeta.foundations.atomic``), so a crash at any moment leaves either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from sparsemeta.config import Config, config_from_dict
from sparsemeta.foundations.atomic import atomic_write, atomic_write_text
from sparsemeta.foundations.errors import UserError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def make_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory '{path}': {exc.strerror}; choose another --out") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory '{path}' is not writable; choose another --out")
    return path


def _diff(a: Any, b: Any, prefix: str = "") -> str | None:
    """First difference; keys absent from the old config ``a`` (added by a later version of
    sparsemeta, whose defaults keep the old behaviour) are not differences."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b)) + sorted(set(a) - set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} in the run, {b!r} now"


def config_difference(old: dict, new: dict) -> str | None:
    """First differing key of two resolved configs, ignoring ``device`` (runs may move
    between machines); anything else would silently mix two experiments in one directory."""
    a, b = dict(old), dict(new)
    a.pop("device", None)
    b.pop("device", None)
    return _diff(a, b)


def bind_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config, or check that an existing run was made with the same one."""
    path = run_dir / "config.yaml"
    new = cfg.to_dict()
    if path.exists():
        d = config_difference(yaml.safe_load(path.read_text()), new)
        if d:
            raise UserError(
                f"'{run_dir}' holds a run with a different config ({d}); use another --out"
            )
        return
    atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use --set device=cpu or auto")
    return torch.device(name)
