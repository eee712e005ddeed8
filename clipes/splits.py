"""Dataset splits as lists of image names: the authors' list files and where VOC and COCO keep them.

Pure Python (no torch), so that ``clipes eval`` can scope its scores to a split without loading a model
stack: ``label --dataset`` and ``eval --dataset`` find a split the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ClipesError
from .names import image_key

__all__ = ["DatasetError", "EvalSplit", "coco_instances", "eval_split", "read_split_file", "scoped_stems",
           "voc_ground_truth", "voc_root", "voc_split_file"]


class DatasetError(ClipesError):
    """A dataset folder does not have the expected layout."""


def read_split_file(path: Path) -> tuple[list[str], int]:
    """Image names, one per line (first word; folders and an image suffix dropped), as the authors' lists;
    each once, in order, and how many lines repeated a name."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"--split-file {path}: cannot read it ({e})") from None
    stems = [image_key(line.split()[0]).rsplit("/", 1)[-1] for line in lines if line.strip()]
    if not stems:
        raise DatasetError(f"--split-file {path}: no image names in it")
    once = list(dict.fromkeys(stems))
    return once, len(stems) - len(once)


def voc_root(root: Path) -> Path:
    """The VOC2012 folder (the one holding JPEGImages/) at or under ``root``."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{root}: no JPEGImages/ found (expected VOCdevkit/VOC2012 or a folder holding it)")


def voc_split_file(voc: Path, split: str) -> Path:
    """``ImageSets/Segmentation[Aug]/<split>.txt`` (else ``ImageSets/Main``) of a VOC2012 folder."""
    candidates = [voc / "ImageSets" / "Segmentation" / f"{split}.txt",
                  voc / "ImageSets" / "SegmentationAug" / f"{split}.txt", voc / "ImageSets" / "Main" / f"{split}.txt"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DatasetError(f"{voc}: no split file for {split!r} (looked for {', '.join(str(c) for c in candidates)})")
    return found


def voc_ground_truth(voc: Path) -> Path | None:
    """The ground-truth folder of a VOC2012 folder: SegmentationClassAug, else SegmentationClass."""
    return next((voc / d for d in ("SegmentationClassAug", "SegmentationClass") if (voc / d).is_dir()), None)


def coco_instances(root: Path, split: str) -> Path:
    """``annotations/instances_<split>2014.json`` under a COCO 2014 root."""
    ann = root / "annotations" / f"instances_{split.removesuffix('2014')}2014.json"
    if not ann.is_file():
        raise DatasetError(f"{root}: no annotations/{ann.name}")
    return ann


@dataclass
class EvalSplit:
    """The images ``clipes eval`` scores: ``stems`` (None: every ground-truth image), named by ``source``,
    and the ground truth they are scored against."""

    ground_truth: Path
    stems: list[str] | None
    source: str | None
    repeated: int = 0


def eval_split(gt: Path, dataset: str | None, split: str | None, split_file: Path | None) -> EvalSplit:
    """What ``clipes eval GT [--dataset D --split S] [--split-file F]`` scores.

    Without ``dataset``, GT is the ground truth (a folder or a COCO JSON) and ``split_file`` (if any) names
    the images to score. With ``dataset``, GT is the dataset root: VOC scores the split's list
    (``ImageSets/Segmentation/<split>.txt``, or ``split_file``) against SegmentationClass[Aug]; COCO scores
    ``instances_<split>2014.json`` (every image with an object, as the authors' lists, or ``split_file``'s).
    """
    if dataset is None:
        if split is not None:
            raise DatasetError("--split names a split of --dataset voc or coco; for your own list use --split-file")
        if split_file is None:
            return EvalSplit(gt, None, None)
        stems, repeated = read_split_file(split_file)
        return EvalSplit(gt, stems, f"--split-file {split_file}", repeated)
    split = split or "val"
    if dataset == "voc":
        voc = voc_root(gt)
        truth = voc_ground_truth(voc)
        if truth is None:
            raise DatasetError(f"{voc}: no SegmentationClassAug/ or SegmentationClass/ ground truth")
        listed = split_file or voc_split_file(voc, split)
        stems, repeated = read_split_file(listed)
        return EvalSplit(truth, stems, f"voc/{split} ({listed})" if split_file is None else
                         f"--split-file {split_file}", repeated)
    if dataset == "coco":
        ann = coco_instances(gt, split)
        if split_file is None:
            return EvalSplit(ann, None, f"coco/{split.removesuffix('2014')} ({ann.name})")
        stems, repeated = read_split_file(split_file)
        return EvalSplit(ann, stems, f"--split-file {split_file}", repeated)
    raise DatasetError(f"--dataset {dataset!r}: choose voc or coco")


def scoped_stems(listed: list[str], known: list[str], where: str, source: str) -> list[str]:
    """The ground-truth keys of the ``listed`` names (matched by file stem, as the authors' lists name
    images); a name with no ground truth in ``where`` is refused, naming the list."""
    by_name: dict[str, str] = {}
    for key in known:
        by_name.setdefault(key.rsplit("/", 1)[-1], key)
    unknown = [name for name in listed if name not in by_name]
    if unknown:
        raise DatasetError(f"{source}: {len(unknown)} of {len(listed)} listed image(s) have no ground truth in "
                           f"{where}, e.g. {unknown[0]}; is it the list of another dataset or split?")
    return [by_name[name] for name in listed]
