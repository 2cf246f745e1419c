"""Metrics writers, as callbacks of the training loop: JSONL always (the run directory's record,
read by reports), TensorBoard scalars too when the optional ``tensorboard`` package is installed
(``pip install -e ".[tensorboard]"``), so a run is watched the way researchers already watch runs.

On resume, ``metrics.jsonl`` keeps only the lines up to the checkpoint's iteration and is rewritten
atomically; a torn last line (disk full, power loss while appending) is dropped, never fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from sparsemeta.foundations.atomic import atomic_write_text
from sparsemeta.foundations.errors import UserError
from sparsemeta.foundations.safeio import load_json, read_bytes
from sparsemeta.training.rundir import METRICS, TENSORBOARD


class MetricsWriter(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


#: a metrics file holds about 100 bytes per meta-iteration: this is ~2 million iterations
MAX_METRICS_BYTES = 256 << 20


def read_metrics(path: Path, keep_until: int | None = None) -> list[dict[str, Any]]:
    """The complete records of a metrics file (a torn or unparsable line is skipped), up to
    iteration ``keep_until`` if given."""
    records = []
    raw = read_bytes(path, limit=MAX_METRICS_BYTES, what=f"metrics file '{path}'")
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            record = load_json(line, where="a metrics line")  # bounded depth, like every file
        except UserError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) and (
                keep_until is None or record["iteration"] <= keep_until):
            records.append(record)
    return records


class JsonlWriter:
    """Append-only JSONL, truncated to ``keep_until`` (atomically) when a run resumes."""

    def __init__(self, path: Path, keep_until: int) -> None:
        if path.exists():
            kept = read_metrics(path, keep_until)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.fh = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class TensorBoardWriter:
    """Scalars ``<split>/<name>`` at the record's iteration (lists such as per-step accuracy
    are left to the JSONL file)."""

    def __init__(self, directory: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the checkpoint that a killed run had already written
        self.writer = SummaryWriter(str(directory), purge_step=purge_step or None)

    def write(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        for key, value in record.items():
            if key not in ("iteration", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, record["iteration"])

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def open_writers(run: Path | None, keep_until: int) -> list[MetricsWriter]:
    """The writers of a run directory (none without one: ranks other than 0 write nothing)."""
    if run is None:
        return []
    writers: list[MetricsWriter] = [JsonlWriter(run / METRICS, keep_until)]
    if tensorboard_available():
        writers.append(TensorBoardWriter(run / TENSORBOARD, keep_until))
    return writers
