"""The output folder of a labelling run: atomic writes, a manifest, and resuming where a run stopped."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ClipesError
from .labeler import LabelResult
from .masks import mask_to_png, overlay

__all__ = ["OutputError", "RunOutput", "atomic_write"]


class OutputError(ClipesError):
    """The output folder cannot be used as asked."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_image(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """An image file's bytes (PNG by default), ready for ``atomic_write``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


class RunOutput:
    """``masks/``, ``cams/``, ``overlays/``, ``labels.json`` and ``manifest.json`` under one folder.

    The manifest records the settings that shape the masks; reusing a folder with other settings
    is refused unless ``overwrite``, so results of different runs are never mixed.
    """

    MANIFEST = "manifest.json"
    LABELS = "labels.json"

    def __init__(self, root: Path, settings: dict[str, Any], *, save_cams: bool = False,
                 overlays: bool = False, overwrite: bool = False, rank: int = 0, world: int = 1) -> None:
        self.root = root
        self.save_cams = save_cams
        self.overlays = overlays
        self.overwrite = overwrite
        self.settings = settings
        self.rank, self.world = rank, world
        manifest = root / self.MANIFEST
        if manifest.exists() and not overwrite:
            try:
                previous = json.loads(manifest.read_text(encoding="utf-8")).get("settings", {})
            except (json.JSONDecodeError, OSError) as e:
                raise OutputError(f"{manifest}: unreadable manifest ({e}); use --overwrite or another --out") from e
            changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
            if changed:
                raise OutputError(f"{root} holds a run made with other settings ({', '.join(changed)}); "
                                  "use --overwrite to redo it or choose another --out")
        self.labels: dict[str, dict[str, Any]] = {}
        if not overwrite:  # what earlier runs finished, including the per-rank files of a stopped torchrun job
            for f in [root / self.LABELS, *sorted(root.glob(".labels.rank*.json"))]:
                try:
                    self.labels.update(json.loads(f.read_text(encoding="utf-8")))
                except (json.JSONDecodeError, OSError):
                    continue

    def mask_path(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def cams_path(self, stem: str) -> Path:
        return self.root / "cams" / f"{stem}.npz"

    def overlay_path(self, stem: str) -> Path:
        return self.root / "overlays" / f"{stem}.jpg"

    def is_done(self, stem: str) -> bool:
        """Whether a previous run already wrote everything this run would write for ``stem``."""
        if self.overwrite or stem not in self.labels or not self.mask_path(stem).exists():
            return False
        if self.save_cams and not self.cams_path(stem).exists():
            return False
        return not (self.overlays and not self.overlay_path(stem).exists())

    def write(self, stem: str, result: LabelResult, class_names: tuple[str, ...],
              image: Image.Image | None = None, file: str | None = None) -> None:
        """Write one image's outputs; the mask last, so that its presence means the image is done."""
        if self.save_cams:
            buf = io.BytesIO()
            arrays = {"labels": result.labels.astype(np.int64), "cam": result.cam.astype(np.float32),
                      "cam_refined": result.cam_refined.astype(np.float32)}
            if result.confidence is not None:
                arrays["confidence"] = result.confidence.astype(np.float32)
            np.savez_compressed(buf, **arrays)
            atomic_write(self.cams_path(stem), buf.getvalue())
        if self.overlays and image is not None:
            names = {int(c) + 1: class_names[int(c)] for c in result.labels}
            atomic_write(self.overlay_path(stem), encode_image(overlay(image, result.mask, names), "JPEG", quality=90))
        atomic_write(self.mask_path(stem), encode_image(mask_to_png(result.mask)))
        entry: dict[str, Any] = {"labels": [class_names[i] for i in result.labels], "source": result.label_source}
        if file is not None:
            entry["file"] = file
        if result.scores:
            entry["scores"] = result.scores
        self.labels[stem] = entry

    def _labels_bytes(self, labels: dict[str, dict[str, Any]]) -> bytes:
        return (json.dumps(dict(sorted(labels.items())), indent=1) + "\n").encode()

    def flush(self, manifest: dict[str, Any]) -> None:
        """Save progress: ``labels.json`` and the manifest, or this rank's own file under torchrun."""
        if self.world > 1:
            atomic_write(self.root / f".labels.rank{self.rank}.json", self._labels_bytes(self.labels))
            return
        self.finalize([self.labels], manifest)

    def finalize(self, labels: list[dict[str, dict[str, Any]]], manifest: dict[str, Any]) -> None:
        """Write the merged ``labels.json`` and the manifest, then drop per-rank progress files."""
        merged: dict[str, dict[str, Any]] = {}
        for part in labels:
            merged.update(part)
        atomic_write(self.root / self.LABELS, self._labels_bytes(merged))
        atomic_write(self.root / self.MANIFEST,
                     (json.dumps({**manifest, "settings": self.settings}, indent=1) + "\n").encode())
        for f in self.root.glob(".labels.rank*.json"):
            f.unlink(missing_ok=True)


def check_outside(images: Path, out: Path) -> None:
    """Refuse an output folder that is the input folder or inside it: clipes never writes into its input."""
    src, dst = images.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise OutputError(f"--out {out} is inside the input folder {images}; clipes never writes there")
