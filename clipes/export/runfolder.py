"""A finished ``clipes label`` run read for export: its class set, its images' records and their masks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ClipesError
from ..evaluate import read_label_png
from ..jsonfile import read_json, read_run_labels
from ..masks import IGNORE
from ..prompts import ClassSet

__all__ = ["ExportRun", "RunImage", "check_run_folder", "open_run"]


@dataclass(frozen=True)
class RunImage:
    """One labelled image of a run: its stem (``a/b``), its file relative to the run's input folder, the
    image-level labels the masks were made from, where they came from, and the tagger's scores if tagged."""

    stem: str
    file: str
    labels: tuple[str, ...]
    source: str
    scores: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None


@dataclass(frozen=True)
class ExportRun:
    """A run's folder, class set, input folder and images (sorted by stem); ``mask`` reads one checked mask."""

    root: Path
    class_set: ClassSet
    input: Path
    images: tuple[RunImage, ...]

    def mask_path(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def image_path(self, image: RunImage) -> Path:
        """Where the run read the photo (it may have moved since)."""
        return self.input / image.file

    def mask(self, stem: str) -> np.ndarray:
        """The (H, W) uint8 mask: 0 background, c + 1 class c, 255 ignored; anything else is an error."""
        path = self.mask_path(stem)
        mask = read_label_png(path)
        bad = mask[(mask > len(self.class_set)) & (mask != IGNORE)]
        if bad.size:
            raise ClipesError(f"{path}: value {int(bad.max())} is no class of {self.class_set.name!r} "
                              f"(0 background, 1-{len(self.class_set)} its classes, 255 ignored); was the mask "
                              "edited, or the run made with another class set?")
        return mask

    def masks(self) -> Iterator[tuple[RunImage, np.ndarray]]:
        for image in self.images:
            yield image, self.mask(image.stem)


def _image(stem: str, rec: dict, class_set: ClassSet, where: Path) -> RunImage:
    labels, file = rec.get("labels", []), rec.get("file")
    if not isinstance(file, str) or not file:
        raise ClipesError(f"{where}: entry {stem!r} names no image 'file'")
    for name in labels:
        if not isinstance(name, str):
            raise ClipesError(f"{where}: entry {stem!r} has label {name!r}, not a class name")
        class_set.index(name)  # a ClassSetError naming the class
    scores = rec.get("scores", {})
    threshold = rec.get("threshold")
    if not isinstance(scores, dict) or not all(isinstance(v, int | float) for v in scores.values()) or \
            (threshold is not None and not isinstance(threshold, int | float)):
        raise ClipesError(f"{where}: entry {stem!r} has malformed 'scores' or 'threshold'")
    return RunImage(stem, file, tuple(labels), str(rec.get("source", "")),
                    {str(k): float(v) for k, v in scores.items()}, None if threshold is None else float(threshold))


def check_run_folder(run: Path) -> None:
    """A ClipesError unless ``run`` is a folder with a run's ``manifest.json`` and ``labels.json``."""
    if not run.is_dir():
        raise ClipesError(f"{run}: no such run folder")
    if not (run / "manifest.json").is_file() or not (run / "labels.json").is_file():
        raise ClipesError(f"{run} is not a clipes output folder (no manifest.json / labels.json)")


def open_run(run: Path, class_set: ClassSet) -> ExportRun:
    """Check that ``run`` is a clipes run with a mask for every image of its ``labels.json``, reading only.

    ``class_set`` is the one the run's manifest records (``cli.common.run_class_set``). A missing mask is
    an error naming the images: the run was cut short or its files were moved.
    """
    check_run_folder(run)
    manifest_path, labels_path = run / "manifest.json", run / "labels.json"
    manifest = read_json(manifest_path, "run manifest")
    records = read_run_labels(labels_path)
    try:
        images = tuple(_image(stem, rec, class_set, labels_path) for stem, rec in sorted(records.items()))
    except ClipesError as e:
        raise ClipesError(f"{labels_path}: {e}" if str(labels_path) not in str(e) else str(e)) from None
    if not images:
        raise ClipesError(f"{run}: the run holds no labelled image; nothing to export")
    source = manifest.get("input")
    if not isinstance(source, str) or not source:
        raise ClipesError(f"{manifest_path}: records no input folder ('input'); is it a clipes label run?")
    done = ExportRun(run, class_set, Path(source), images)
    missing = [im.stem for im in images if not done.mask_path(im.stem).is_file()]
    if missing:
        raise ClipesError(f"{run}: {len(missing)} image(s) of labels.json have no mask in {run / 'masks'} "
                          f"(e.g. {missing[0]!r}); rerun clipes label into {run} to finish it")
    return done
