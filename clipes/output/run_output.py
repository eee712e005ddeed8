"""The output folder of a labelling run: its layout, its journal and its lock under one ``RunOutput``.

A rerun skips an image only when the journal's record of it still holds (same input file, given labels
and settings) and every file it names is whole, so an image replaced in place is redone and outputs of
different settings or inputs never mix.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..masks import mask_to_png, overlay
from ..provenance import settings_key
from .files import OutputError, atomic_write, encode_image
from .journal import Journal
from .layout import KINDS, LABELS, MANIFEST, STATE, RunLayout
from .lock import release_lock, take_lock

if TYPE_CHECKING:
    from ..labeler import LabelResult

__all__ = ["RunOutput"]


class RunOutput:
    """``masks/``, ``cams/``, ``overlays/``, ``labels.json``, ``manifest.json`` and the journal under one folder.

    Construction only reads: it loads what earlier runs recorded and refuses a folder made with
    other ``settings`` (what shapes the masks, compared by meaning) unless ``overwrite``.
    ``open()``, once the inputs and the model have checked out, takes the folder's lock (one
    writer at a time; torchrun ranks of one job share it), clears it for ``overwrite`` and
    starts this process's journal.
    """

    MANIFEST = MANIFEST
    LABELS = LABELS
    STATE = STATE

    def __init__(self, root: Path, settings: dict[str, Any], *, save_cams: bool = False,
                 overlays: bool = False, overwrite: bool = False, rank: int = 0, world: int = 1) -> None:
        self.root = root
        self.save_cams = save_cams
        self.overlays = overlays
        self.overwrite = overwrite
        self.settings = settings
        self.key = settings_key(settings)
        self.rank, self.world = rank, world
        self.layout = RunLayout(root)
        self.journal = Journal(root / STATE)
        self.records: dict[str, dict[str, Any]] = {}
        self._lock: IO[str] | None = None
        self._mutex = threading.Lock()
        if not overwrite:
            self.records = self.journal.read()
            self._check_settings()

    # ----------------------------------------------------------------- reading
    def _check_settings(self) -> None:
        manifest = self.root / self.MANIFEST
        refuse = "use --overwrite to redo it or choose another --out"
        if manifest.exists():
            try:
                previous = json.loads(manifest.read_text(encoding="utf-8")).get("settings", {})
                if not isinstance(previous, dict):
                    raise ValueError("'settings' is not a mapping")
            except (ValueError, OSError, AttributeError) as e:
                raise OutputError(f"{manifest}: unreadable manifest ({e}); use --overwrite or another --out") from e
            changed = sorted(k for k in self.settings.keys() | previous.keys()
                             if self.settings.get(k) != previous.get(k))
            if changed:
                raise OutputError(f"{self.root} holds a run made with other settings ({', '.join(changed)}); {refuse}")
        if any(rec.get("settings") != self.key for rec in self.records.values()):
            raise OutputError(f"{self.root} holds outputs made with other settings (recorded in "
                              f"{self.STATE}/, its manifest.json is missing or edited); {refuse}")
        # masks without a record nor a manifest (which a run writes before its first mask) are not clipes'
        # own; with the manifest they are the first masks of a run killed before their records: redone
        masks = self.root / "masks"
        if not self.records and not manifest.exists() and masks.is_dir() and \
                any(p.is_file() for p in masks.rglob("*.png")):
            raise OutputError(f"{self.root} holds masks that no clipes run recorded; {refuse}")

    def path(self, kind: str, stem: str) -> Path:
        return self.layout.path(kind, stem)

    def mask_path(self, stem: str) -> Path:
        return self.path("mask", stem)

    def cams_path(self, stem: str) -> Path:
        return self.path("cams", stem)

    def overlay_path(self, stem: str) -> Path:
        return self.path("overlay", stem)

    def _wanted(self) -> list[str]:
        return ["mask"] + ["cams"] * self.save_cams + ["overlay"] * self.overlays

    def is_done(self, stem: str, stamp: dict[str, Any], given: list[str] | None) -> bool:
        """Whether an earlier run wrote, whole, everything this run would write for ``stem``, from the
        same input file (``stamp``), the same given labels (None: inferred) and the same settings."""
        rec = self.records.get(stem)
        if rec is None or self.overwrite or rec.get("settings") != self.key or rec.get("input") != stamp \
                or rec.get("given") != given:
            return False
        outputs = rec.get("outputs", {})
        for kind in self._wanted():
            path = self.path(kind, stem)
            try:
                if kind not in outputs or path.stat().st_size != outputs[kind]:
                    return False  # missing, truncated or replaced
            except OSError:
                return False
        return True

    # ----------------------------------------------------------------- writing
    def open(self) -> None:
        """Start writing: lock the folder (rank 0), clear it for ``overwrite`` (rank 0), open the journal.

        Under torchrun, rank 0 opens first and the others after it (see ``clipes.run``).
        """
        try:
            self.journal.state.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                self._lock = take_lock(self.root)
                if self.overwrite:
                    self._clear()
            self.journal.open(self.rank, self.world)
        except OSError as e:
            self.close()
            raise OutputError(f"cannot write to {self.root}: {e.strerror or e}") from e

    def _clear(self) -> None:
        """``overwrite``: remove every output and record of earlier runs, and what was derived from them."""
        self.layout.clear()
        self.journal.remove()
        self.records = {}

    def write(self, stem: str, result: LabelResult, class_names: tuple[str, ...],
              stamp: dict[str, Any], given: list[str] | None, image: Image.Image | None = None) -> None:
        """Write one image's outputs, then its record; drop outputs of kinds this run does not make."""
        files: dict[str, bytes] = {}
        if self.save_cams:
            buf = io.BytesIO()
            arrays = {"labels": result.labels.astype(np.int64), "cam": result.cam.astype(np.float32),
                      "cam_refined": result.cam_refined.astype(np.float32)}
            if result.confidence is not None:
                arrays["confidence"] = result.confidence.astype(np.float32)
            np.savez_compressed(buf, **arrays)
            files["cams"] = buf.getvalue()
        if self.overlays and image is not None:
            names = {int(c) + 1: class_names[int(c)] for c in result.labels}
            files["overlay"] = encode_image(overlay(image, result.mask, names), "JPEG", quality=90)
        files["mask"] = encode_image(mask_to_png(result.mask))
        for kind in KINDS:
            if kind not in files:
                self.path(kind, stem).unlink(missing_ok=True)  # an older result of this image
        for kind, data in files.items():
            atomic_write(self.path(kind, stem), data)
        rec = {"stem": stem, "written_ns": time.time_ns(), "settings": self.key, "input": stamp, "given": given,
               "labels": [class_names[i] for i in result.labels], "source": result.label_source,
               "outputs": {kind: len(data) for kind, data in files.items()}}
        if result.scores:
            rec["scores"] = result.scores
        if result.threshold is not None:
            rec["threshold"] = round(result.threshold, 8)
        with self._mutex:
            self.journal.append(rec)
            self.records[stem] = rec

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.root / self.MANIFEST,
                     (json.dumps({**manifest, "settings": self.settings}, indent=1) + "\n").encode())

    def flush(self, manifest: dict[str, Any]) -> None:
        """Save progress for people reading the folder during a run (the journal is what resumes)."""
        if self.world > 1:
            return
        with self._mutex:
            records = dict(self.records)
        atomic_write(self.root / self.LABELS, self.layout.labels_json(records))
        self._write_manifest(manifest)

    def close_journal(self) -> None:
        """No more writes from this process (the lock stays until ``close``)."""
        self.journal.close()

    def close(self) -> None:
        """Close the journal and release the lock."""
        self.close_journal()
        release_lock(self._lock)
        self._lock = None

    def finalize(self, manifest: dict[str, Any]) -> None:
        """Rank 0 once every rank has closed its journal: one compact journal, ``labels.json`` and the manifest."""
        records = self.journal.merge()
        atomic_write(self.root / self.LABELS, self.layout.labels_json(records))
        self._write_manifest(manifest)
