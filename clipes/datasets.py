"""Standard datasets: PASCAL VOC 2012 and MS COCO 2014 (images, image-level labels, ground truth).

A dataset gives the images of a split with their image-level labels, so that ``clipes label
--dataset voc --root R --split train`` runs without a labels file, and ground-truth masks for
``clipes eval``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ClipesError
from .jsonfile import read_json
from .labels import image_key, read_labels, read_voc_xml
from .output import entry_path
from .prompts import ClassSet, load_class_set

__all__ = ["CocoGroundTruth", "DatasetError", "DatasetSplit", "coco_split", "listed_images", "load_split",
           "voc_split"]


class DatasetError(ClipesError):
    """A dataset folder does not have the expected layout."""


@dataclass
class DatasetSplit:
    """The images of a split as (stem, path), their labels, and where ground truth lives."""

    name: str
    class_set: ClassSet
    root: Path
    items: list[tuple[str, Path]]
    labels: dict[str, list[int]]
    gt_dir: Path | None = None
    coco_json: Path | None = None
    left_out: int = 0
    repeated: int = 0  # lines of a split file that named an image again (each image is taken once)


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


def listed_images(items: list[tuple[str, Path]], split_file: Path, where: str) -> tuple[list[tuple[str, Path]], int]:
    """The images (stem, path) that ``split_file`` names (by file stem), and how many lines repeated a name;
    a name of no image (of ``where``) is refused."""
    listed, repeated = read_split_file(split_file)
    known = {stem.rsplit("/", 1)[-1] for stem, _ in items}
    unknown = [name for name in listed if name not in known]
    if unknown:
        raise DatasetError(f"--split-file {split_file}: {len(unknown)} name(s) not in {where}, "
                           f"e.g. {unknown[0]}")
    wanted = set(listed)
    return [(stem, p) for stem, p in items if stem.rsplit("/", 1)[-1] in wanted], repeated


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{root}: no JPEGImages/ found (expected VOCdevkit/VOC2012 or a folder holding it)")


def voc_split(root: str | Path, split: str, split_file: Path | None = None) -> DatasetSplit:
    """PASCAL VOC 2012: ``ImageSets/Segmentation[Aug]/<split>.txt`` or ``split_file``; labels from ``Annotations/``."""
    voc = _voc_root(Path(root))
    candidates = [voc / "ImageSets" / "Segmentation" / f"{split}.txt",
                  voc / "ImageSets" / "SegmentationAug" / f"{split}.txt", voc / "ImageSets" / "Main" / f"{split}.txt"]
    split_file = split_file or next((c for c in candidates if c.is_file()), None)
    if split_file is None:
        raise DatasetError(f"{voc}: no split file for {split!r} (looked for {', '.join(str(c) for c in candidates)})")
    stems, repeated = read_split_file(split_file)
    class_set = load_class_set("voc")
    ann = voc / "Annotations"
    if not ann.is_dir():
        raise DatasetError(f"{voc}: no Annotations/ folder for the image-level labels")
    missing = [s for s in stems if not (ann / f"{s}.xml").is_file() or not (voc / "JPEGImages" / f"{s}.jpg").is_file()]
    if missing:
        raise DatasetError(f"{split_file}: {len(missing)} image(s) without JPEGImages/*.jpg or Annotations/*.xml, "
                           f"e.g. {missing[0]}")
    labels = read_voc_xml([ann / f"{s}.xml" for s in stems], class_set)
    gt = next((voc / d for d in ("SegmentationClassAug", "SegmentationClass") if (voc / d).is_dir()), None)
    return DatasetSplit(f"voc/{split}", class_set, voc, [(s, voc / "JPEGImages" / f"{s}.jpg") for s in stems],
                        labels, gt_dir=gt, repeated=repeated)


def coco_split(root: str | Path, split: str, split_file: Path | None = None) -> DatasetSplit:
    """MS COCO 2014: ``<split>2014/`` images and ``annotations/instances_<split>2014.json``.

    As the authors' lists (82,081 train and 40,137 val images), only images with at least one
    (non-crowd) label are taken, unless ``split_file`` names the images; ``left_out`` counts the rest.
    """
    root = Path(root)
    split = split.removesuffix("2014")
    ann = root / "annotations" / f"instances_{split}2014.json"
    images = root / f"{split}2014"
    if not ann.is_file():
        raise DatasetError(f"{root}: no annotations/instances_{split}2014.json")
    if not images.is_dir():
        raise DatasetError(f"{root}: no {split}2014/ image folder")
    class_set = load_class_set("coco")
    labels = read_labels(ann, class_set)
    data = json.loads(ann.read_text())
    # keyed as the labels are: the file name relative to the image folder, sub-folders included; a name
    # that leaves the folder would have its mask written over the image itself, or outside --out
    items = [(image_key(im["file_name"]), entry_path(images, im["file_name"], f"{ann}: images[{i}] file_name"))
             for i, im in enumerate(data["images"])]
    repeated = 0
    if split_file is not None:
        kept, repeated = listed_images(items, split_file, ann.name)
    else:
        kept = [(stem, p) for stem, p in items if labels.get(stem)]
    left_out, items = len(items) - len(kept), kept
    missing = [p for _, p in items if not p.is_file()]
    if missing:
        raise DatasetError(f"{images}: {len(missing)} image(s) listed in {ann.name} are missing, "
                           f"e.g. {missing[0].name}")
    return DatasetSplit(f"coco/{split}", class_set, root, sorted(items), labels, coco_json=ann, left_out=left_out,
                        repeated=repeated)


def load_split(name: str, root: str | Path, split: str, split_file: Path | None = None) -> DatasetSplit:
    if name == "voc":
        return voc_split(root, split, split_file)
    if name == "coco":
        return coco_split(root, split, split_file)
    raise DatasetError(f"--dataset {name!r}: choose voc or coco")


_COCO_FIELDS = {"images": ("id", "file_name", "height", "width"), "categories": ("id", "name"),
                "annotations": ("image_id", "category_id", "segmentation")}


def _checked_instances(path: Path) -> dict:
    """A COCO instances JSON with the lists and fields ground truth needs, or a ClipesError naming the file."""
    data = read_json(path, "COCO instances JSON")
    for key, fields in _COCO_FIELDS.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise ClipesError(f"{path}: no {key!r} list; is this a COCO instances JSON?")
        for i, entry in enumerate(entries):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ClipesError(f"{path}: {key}[{i}] has no {missing[0]!r}")
    for i, im in enumerate(data["images"]):
        if not all(isinstance(im[f], int) and not isinstance(im[f], bool) and im[f] > 0 for f in ("height", "width")):
            raise ClipesError(f"{path}: images[{i}] needs a positive integer 'height' and 'width'")
    images = {im["id"] for im in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in categories:
            raise ClipesError(f"{path}: annotations[{i}] has category_id {ann['category_id']}, not in 'categories'")
        if ann["image_id"] not in images:
            raise ClipesError(f"{path}: annotations[{i}] has image_id {ann['image_id']}, not in 'images'")
    return data


class CocoGroundTruth:
    """Semantic ground truth rasterised from COCO instances (pycocotools): 0 background, c + 1 class c.

    Objects are painted largest first so that small ones stay visible; crowd regions not covered by
    an object are 255 (ignored), as are images' pixels nobody can label.
    """

    def __init__(self, instances_json: str | Path, class_set: ClassSet | None = None) -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError as e:
            raise ClipesError("COCO ground truth needs pycocotools: pip install 'clipes[coco]'") from e
        self.path = Path(instances_json)
        data = _checked_instances(self.path)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.class_set = class_set or load_class_set("coco")
        try:
            self.cat_to_value = {c["id"]: self.class_set.index(str(c["name"])) + 1
                                 for c in self.coco.dataset["categories"]}
        except ClipesError as e:
            raise ClipesError(f"{self.path}: {e}") from None
        self.by_stem = {image_key(im["file_name"]): im["id"] for im in self.coco.dataset["images"]}
        # scored, as labelled, are the images with at least one non-crowd object (the authors' lists)
        with_objects = {a["image_id"] for a in self.coco.dataset["annotations"] if not a.get("iscrowd", 0)}
        self.scored = sorted(stem for stem, i in self.by_stem.items() if i in with_objects)
        self.left_out = len(self.by_stem) - len(self.scored)

    def __contains__(self, stem: str) -> bool:
        return stem in self.by_stem

    def where(self, stem: str) -> str:
        """The image's entry in the instances JSON, for messages."""
        return f"{self.path} (image {self.coco.imgs[self.by_stem[stem]]['file_name']})"

    def stems(self) -> list[str]:
        return list(self.scored)

    def mask(self, stem: str) -> np.ndarray:
        image_id = self.by_stem[stem]
        info = self.coco.imgs[image_id]
        out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        crowd = np.zeros_like(out, dtype=bool)
        covered = np.zeros_like(out, dtype=bool)
        for ann in sorted(anns, key=lambda a: -a.get("area", 0)):
            try:
                m = self.coco.annToMask(ann).astype(bool)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                raise ClipesError(f"{self.where(stem)}: annotation {ann.get('id')} has an unreadable "
                                  f"segmentation ({type(e).__name__}: {e})") from None
            if ann.get("iscrowd", 0):
                crowd |= m
            else:
                out[m] = self.cat_to_value[ann["category_id"]]
                covered |= m
        out[crowd & ~covered] = 255
        return out
