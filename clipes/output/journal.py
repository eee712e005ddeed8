"""The journal of a labelling run: one JSON line per image written, saying what made its outputs.

Every image's outputs are followed by one line in ``.clipes/records.jsonl`` (``records.rankN.jsonl`` per
torchrun rank until the job merges them) that says what they were made from: the input file (name, size,
modification time), the labels given, the run's settings, and the bytes of each file written. A rerun
resumes from it, so the record is exactly as durable as the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from .files import OutputError, atomic_write

__all__ = ["Journal"]


def _written(rec: dict[str, Any]) -> int:
    """When a journal record was written (ns since the epoch; 0 if it does not say)."""
    t = rec.get("written_ns")
    return t if isinstance(t, int) else 0


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class Journal:
    """The journals under ``state``: read them all, append to this process's own, merge them into one."""

    MAIN = "records.jsonl"

    def __init__(self, state: Path) -> None:
        self.state = state
        self._file: IO[str] | None = None

    def paths(self) -> list[Path]:
        """The main journal, then the per-rank ones a torchrun job leaves until it merges them."""
        return [self.state / self.MAIN, *sorted(self.state.glob("records.rank*.jsonl"))]

    def read(self) -> dict[str, dict[str, Any]]:
        """The latest record of every image in the journals; a line cut short by a kill is passed over.

        Latest by the time each record holds, not by journal: a torchrun job killed before its merge
        leaves per-rank journals that are older than what a later run appends to the main one.
        """
        records: dict[str, dict[str, Any]] = {}
        for path in self.paths():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise OutputError(f"{path}: unreadable run record ({e}); use --overwrite or another --out") from e
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("stem"), str):
                    seen = records.get(rec["stem"])
                    if seen is None or _written(rec) >= _written(seen):
                        records[rec["stem"]] = rec
        return records

    def open(self, rank: int = 0, world: int = 1) -> None:
        """Open this process's journal for appending (OSError if it cannot be)."""
        path = self.state / (self.MAIN if world == 1 else f"records.rank{rank}.jsonl")
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
        if _ends_mid_line(path):  # a kill cut the last line: the next record starts on its own
            self._file.write("\n")

    def append(self, rec: dict[str, Any]) -> None:
        """One record, flushed: in the kernel's hands, it survives the process being killed."""
        if self._file is None:
            raise RuntimeError("RunOutput.open() must come before write()")
        try:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.state}: {e.strerror or e}") from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Delete every journal (``--overwrite``)."""
        for path in self.paths():
            path.unlink(missing_ok=True)

    def merge(self) -> dict[str, dict[str, Any]]:
        """Every journal's latest records into one compact main journal; returns them."""
        records = self.read()
        atomic_write(self.state / self.MAIN, "".join(json.dumps(r) + "\n" for _, r in sorted(records.items()))
                     .encode())
        for path in self.paths()[1:]:
            path.unlink(missing_ok=True)
        return records
