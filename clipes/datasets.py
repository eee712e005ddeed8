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
from .splits import DatasetError, read_split_file, voc_ground_truth, voc_root, voc_split_file

__all__ = ["CocoGroundTruth", "DatasetError", "DatasetSplit", "coco_split", "listed_images", "load_split",
           "read_split_file", "voc_split"]


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


def voc_split(root: str | Path, split: str, split_file: Path | None = None) -> DatasetSplit:
    """PASCAL VOC 2012: ``ImageSets/Segmentation[Aug]/<split>.txt`` or ``split_file``; labels from ``Annotations/``."""
    voc = voc_root(Path(root))
    split_file = split_file or voc_split_file(voc, split)
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
    gt = voc_ground_truth(voc)
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

    def known(self) -> list[str]:
        """Every image of the JSON, with objects or not (what a split list may name)."""
        return list(self.by_stem)

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
