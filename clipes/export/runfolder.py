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
from ..output import entry_path, lock_state
from ..pixels import open_image
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
    inputs: dict[str, Path] = field(default_factory=dict)  # the files the run read, by flag: never written
    exif_transpose: bool = True  # whether the run turned photos by their EXIF orientation
    partial: str | None = None  # why only some images are exported (--partial), else None

    def mask_path(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def image_path(self, image: RunImage) -> Path:
        """Where the run read the photo (it may have moved since)."""
        return self.input / image.file

    def mask(self, stem: str, image_path: Path | None = None) -> np.ndarray:
        """The (H, W) uint8 mask: 0 background, c + 1 class c, 255 ignored, of its photo's size (when the photo
        ``image_path`` is there to say); anything else is an error."""
        path = self.mask_path(stem)
        mask = read_label_png(path)
        bad = mask[(mask > len(self.class_set)) & (mask != IGNORE)]
        if bad.size:
            raise ClipesError(f"{path}: value {int(bad.max())} is no class of {self.class_set.name!r} "
                              f"(0 background, 1-{len(self.class_set)} its classes, 255 ignored); was the mask "
                              "edited, or the run made with another class set?")
        self._check_size(path, mask, image_path)
        return mask

    def _check_size(self, path: Path, mask: np.ndarray, photo: Path) -> None:
        """A mask must cover its photo pixel for pixel (as the run saw it: EXIF-turned or not)."""
        size = photo_size(photo, self.exif_transpose)
        if size is not None and size != (mask.shape[1], mask.shape[0]):
            raise ClipesError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its photo {photo} is "
                              f"{size[0]}x{size[1]}; was the mask or the photo replaced since the run?")

    def masks(self) -> Iterator[tuple[RunImage, np.ndarray]]:
        for image in self.images:
            yield image, self.mask(image.stem, self.image_path(image))


def photo_size(path: Path, exif_transpose: bool) -> tuple[int, int] | None:
    """A photo's (width, height) from its header, turned as its EXIF orientation says when ``exif_transpose``;
    None when it is not there to read (the masks are then exported as they are)."""
    try:
        with open_image(path) as img:
            width, height = img.size
            turned = exif_transpose and img.getexif().get(0x0112) in (5, 6, 7, 8)
    except (ClipesError, OSError):
        return None
    return (height, width) if turned else (width, height)


def _image(stem: str, rec: dict, class_set: ClassSet, where: Path, root: Path) -> RunImage:
    labels, file = rec.get("labels", []), rec.get("file")
    if not isinstance(file, str) or not file:
        raise ClipesError(f"{where}: entry {stem!r} names no image 'file'")
    entry_path(root, file, f"{where}: entry {stem!r} 'file'")  # a photo of the run's input folder, never elsewhere
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


def _recorded_inputs(manifest: dict, source: Path) -> dict[str, Path]:
    """The files the run read (its manifest's ``inputs``, by flag) and its input folder: an export writes none."""
    inputs = manifest.get("inputs")
    recorded = {f"the run's {flag}": Path(p) for flag, p in inputs.items() if isinstance(p, str) and p} \
        if isinstance(inputs, dict) else {}
    return {"the input folder of the run": source, **recorded}


def _unfinished(run: Path, manifest: dict) -> tuple[str, str] | None:
    """Why ``run`` is not a finished run (still written, or stopped) and what to do, or None when it finished.

    Runs of clipes before ``finished`` was recorded finished when their manifest holds a ``summary``."""
    state = lock_state(run)
    if state is not None and state.startswith("held"):
        return (f"the run is still being written ({state.split(' ', 1)[1].strip('()')})",
                "wait for it to finish")
    if manifest.get("finished", "summary" in manifest) is not True:
        return "the run was interrupted", f"resume it first (clipes label into {run} again)"
    return None


def _done_line(run: Path, manifest: dict, done: int, why: str) -> str:
    total = manifest.get("images")
    of = f" of {total}" if isinstance(total, int) and not isinstance(total, bool) and total >= done else ""
    return f"{run}: {done}{of} image(s) labelled; {why}"


def open_run(run: Path, class_set: ClassSet, partial: bool = False) -> ExportRun:
    """Check that ``run`` is a finished clipes run with a mask for every image of its ``labels.json``, reading only.

    ``class_set`` is the one the run's manifest records (``cli.common.run_class_set``). A missing mask is
    an error naming the images: the run was cut short or its files were moved. A run still being written,
    or stopped before it finished, is refused with its counts unless ``partial``: then what is done is
    exported, and ``ExportRun.partial`` says so.
    """
    check_run_folder(run)
    manifest_path, labels_path = run / "manifest.json", run / "labels.json"
    manifest = read_json(manifest_path, "run manifest")
    source = manifest.get("input")
    if not isinstance(source, str) or not source:
        raise ClipesError(f"{manifest_path}: records no input folder ('input'); is it a clipes label run?")
    records = read_run_labels(labels_path)
    try:
        images = tuple(_image(stem, rec, class_set, labels_path, Path(source))
                       for stem, rec in sorted(records.items()))
    except ClipesError as e:
        raise ClipesError(f"{labels_path}: {e}" if str(labels_path) not in str(e) else str(e)) from None
    settings = manifest.get("settings")
    exif = not isinstance(settings, dict) or settings.get("exif_transpose", True) is not False
    done = ExportRun(run, class_set, Path(source), images, _recorded_inputs(manifest, Path(source)), exif)
    unfinished = _unfinished(run, manifest)
    if unfinished is not None:
        why, advice = unfinished
        images = tuple(im for im in images if done.mask_path(im.stem).is_file())
        line = _done_line(run, manifest, len(images), why)
        if not partial:
            raise ClipesError(f"{line}: {advice}, or export what is done with --partial")
        done = ExportRun(run, class_set, Path(source), images, done.inputs, exif, f"{line}; exporting those")
    if not images:
        raise ClipesError(f"{run}: the run holds no labelled image; nothing to export")
    missing = [im.stem for im in images if not done.mask_path(im.stem).is_file()]
    if missing:
        raise ClipesError(f"{run}: {len(missing)} image(s) of labels.json have no mask in {run / 'masks'} "
                          f"(e.g. {missing[0]!r}); rerun clipes label into {run} to finish it")
    return done
