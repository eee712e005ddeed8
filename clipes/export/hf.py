"""A run's masks as a Hugging Face ``datasets.Dataset`` saved with ``save_to_disk`` (Arrow).

One row an image: ``stem``, ``file`` (relative to the run's input folder), ``image`` (the photo's
path, or the photo itself with ``--images copy``), ``mask`` (the run's PNG: 0 background, c + 1
class c, 255 ignored), ``mask_classes`` (the mask's values but 255, as a ``ClassLabel`` whose names map
each mask value to its class: the id-to-name map of the masks, in the features), ``labels`` (class
labels, 0-based: class c), ``label_source``, and, when a tagger found the labels, ``scores`` (its best
classes and their scores) and ``threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ClipesError
from ..masks import IGNORE
from .runfolder import ExportRun

__all__ = ["hf_dataset", "mask_value_names", "write_hf"]


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ClipesError("--format hf needs the Hugging Face datasets library: pip install 'clipes[hf]'") from e
    return datasets


@contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No tqdm bars of ``datasets`` under clipes' own progress."""
    was = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.utils.enable_progress_bars()


def mask_value_names(names: list[str]) -> list[str]:
    """The name of each mask value 0..K: background, then the classes (mask value c + 1 is class c)."""
    background = "background" if "background" not in names else "(background)"
    return [background, *names]


def hf_dataset(run: ExportRun, images: str = "link", advance: Callable[[], None] = lambda: None):
    """The ``datasets.Dataset`` of ``run`` (masks in memory as PNG bytes; photos by path until saved).

    ``images``: ``link`` keeps the photo's path as a string, ``copy`` makes ``image`` an ``Image``
    column (``save_to_disk`` stores the photos' bytes), ``none`` leaves the column out.
    """
    datasets = _datasets()
    from datasets import ClassLabel, Features, Image, List, Value

    names = list(run.class_set.classes)
    tagged = any(im.scores for im in run.images)
    if images != "none":
        missing = [run.image_path(im) for im in run.images if not run.image_path(im).is_file()]
        if missing:
            raise ClipesError(f"--images {images}: {len(missing)} photo(s) are not where the run read them "
                              f"(e.g. {missing[0]}); export with --images none, or move them back")
    columns: dict[str, list] = {"stem": [], "file": [], "image": [], "mask": [], "mask_classes": [], "labels": [],
                                "label_source": [], "scores": [], "threshold": []}
    for image, mask in run.masks():  # each mask checked before its bytes are taken as they are
        columns["stem"].append(image.stem)
        columns["file"].append(image.file)
        path = str(run.image_path(image).resolve())
        columns["image"].append({"path": path, "bytes": None} if images == "copy" else path)
        columns["mask"].append({"path": None, "bytes": run.mask_path(image.stem).read_bytes()})
        columns["mask_classes"].append([int(v) for v in np.unique(mask) if v != IGNORE])
        columns["labels"].append([run.class_set.index(n) for n in image.labels])
        columns["label_source"].append(image.source)
        columns["scores"].append([{"class": run.class_set.index(c), "score": s} for c, s in image.scores.items()])
        columns["threshold"].append(image.threshold)
        advance()
    features = {"stem": Value("string"), "file": Value("string"),
                "image": Image() if images == "copy" else Value("string"), "mask": Image(),
                # the mask's values (255, ignored, aside) with their names: ClassLabel index v is mask value v
                "mask_classes": List(ClassLabel(names=mask_value_names(names))),
                "labels": List(ClassLabel(names=names)), "label_source": Value("string"),
                "scores": List({"class": ClassLabel(names=names), "score": Value("float32")}),
                "threshold": Value("float32")}
    drop = (["image"] if images == "none" else []) + ([] if tagged else ["scores", "threshold"])
    for key in drop:
        del columns[key], features[key]
    legend = ", ".join(f"{c + 1} {n}" for c, n in enumerate(names))
    features = Features(features)
    info = datasets.DatasetInfo(description=f"clipes pseudo masks of the run {run.root.name} (photos under "
                                            f"{run.input}). Mask values: 0 background, {legend}, 255 ignored.",
                                features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def write_hf(run: ExportRun, folder: Path, images: str = "link", advance: Callable[[], None] = lambda: None) -> None:
    """``hf_dataset(run)`` saved into ``folder`` (``datasets.load_from_disk`` reads it back)."""
    datasets = _datasets()
    with _quiet(datasets):
        hf_dataset(run, images, advance).save_to_disk(str(folder))
