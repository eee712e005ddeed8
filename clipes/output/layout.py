"""The file layout of a labelling run's folder: where each output of an image goes, what is derived from
the masks, and clearing them all for ``--overwrite``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["DERIVED", "KINDS", "LABELS", "MANIFEST", "STATE", "RunLayout"]

STATE = ".clipes"  # the journal and the lock
MANIFEST = "manifest.json"
LABELS = "labels.json"
# what each kind of output is called, relative to the run folder
KINDS = {"mask": ("masks", ".png"), "cams": ("cams", ".npz"), "overlay": ("overlays", ".jpg")}
# files derived from the masks: stale once the masks are redone from scratch
DERIVED = (LABELS, MANIFEST, "eval.json", "eval_iou.png")


class RunLayout:
    """``masks/``, ``cams/``, ``overlays/``, ``labels.json`` and ``manifest.json`` under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, stem: str) -> Path:
        folder, suffix = KINDS[kind]
        return self.root / folder / f"{stem}{suffix}"

    def clear(self) -> None:
        """Remove every output of earlier runs (and their temporary files), what was derived from them and
        the view; other files in the output folders stay."""
        for folder, suffix in KINDS.values():
            base = self.root / folder
            if not base.is_dir():
                continue
            for p in sorted(base.rglob("*"), reverse=True):
                if p.is_file() and (p.suffix == suffix or p.name.endswith(".tmp")):
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
            if not any(base.iterdir()):
                base.rmdir()
        for name in DERIVED:
            (self.root / name).unlink(missing_ok=True)
        shutil.rmtree(self.root / "view", ignore_errors=True)

    def labels_json(self, records: dict[str, dict[str, Any]]) -> bytes:
        """``labels.json``: the labels, their source and input file of every image whose mask is there."""
        labels = {}
        for stem, rec in sorted(records.items()):
            if not self.path("mask", stem).is_file():
                continue
            entry: dict[str, Any] = {"labels": rec["labels"], "source": rec["source"], "file": rec["input"]["file"]}
            if "scores" in rec:
                entry["scores"] = rec["scores"]
            if "threshold" in rec:
                entry["threshold"] = rec["threshold"]
            labels[stem] = entry
        return (json.dumps(labels, indent=1) + "\n").encode()
