"""Image-level labels from files: a JSON map, ``stem class class`` text, VOC XML or COCO instances JSON.

Every reader returns ``{image stem: [class index, ...]}`` for a class set; an unknown class name
is an error naming the file (and line), never silently dropped.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import ClipesError
from .names import image_key
from .prompts import ClassSet, ClassSetError

__all__ = ["LabelsError", "image_key", "read_labels", "read_voc_xml"]


class LabelsError(ClipesError):
    """A labels file is malformed or names a class outside the class set."""


def _indices(names: list[str], class_set: ClassSet, where: str) -> list[int]:
    out: list[int] = []
    for name in names:
        try:
            i = class_set.index(str(name))
        except ClassSetError as e:
            raise LabelsError(f"{where}: {e}") from None
        if i not in out:
            out.append(i)
    return out


def _read_json_map(data: dict, class_set: ClassSet, path: Path) -> dict[str, list[int]]:
    out = {}
    for key, names in data.items():
        if isinstance(names, dict) and "labels" in names:  # clipes tag's and clipes label's labels.json entries
            names = names["labels"]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list):
            raise LabelsError(f"{path}: entry {key!r} should be a list of class names")
        out[image_key(key)] = _indices([str(n) for n in names], class_set, f"{path}: entry {key!r}")
    return out


def _read_coco(data: dict, class_set: ClassSet, path: Path) -> dict[str, list[int]]:
    try:
        return _coco_labels(data, class_set, path)
    except (KeyError, TypeError, AttributeError) as e:
        raise LabelsError(f"{path}: not a valid COCO instances file (missing or malformed {e})") from None


def _coco_labels(data: dict, class_set: ClassSet, path: Path) -> dict[str, list[int]]:
    """Each image's classes in ascending class order, as the authors' one-hot label lists give them.

    Crowd annotations make no label: the WSSS label lists CLIP-ES uses come from the non-crowd ones.
    """
    cats = {c["id"]: c["name"] for c in data.get("categories", [])}
    images = {im["id"]: image_key(im["file_name"]) for im in data["images"]}
    try:
        cat_to_class = {cid: class_set.index(name) for cid, name in cats.items()}
    except ClassSetError as e:
        raise LabelsError(f"{path}: COCO category not in class set {class_set.name!r}: {e}") from None
    found: dict[str, set[int]] = {stem: set() for stem in images.values()}
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise LabelsError(f"{path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        if ann["category_id"] not in cat_to_class:
            raise LabelsError(f"{path}: annotation {ann.get('id')} has unknown category {ann['category_id']}")
        if not ann.get("iscrowd", 0):
            found[images[ann["image_id"]]].add(cat_to_class[ann["category_id"]])
    return {stem: sorted(classes) for stem, classes in found.items()}


def _read_text(path: Path, class_set: ClassSet) -> dict[str, list[int]]:
    """Lines ``stem class class ...``; multi-word names ("potted plant") are matched longest first."""
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split("#", 1)[0].replace(",", " ").split()
        if not words:
            continue
        stem, rest, names = words[0], words[1:], []
        while rest:
            for n in range(min(4, len(rest)), 0, -1):
                candidate = " ".join(rest[:n])
                if n == 1 or candidate.lower().replace("_", " ") in class_set.aliases:
                    names.append(candidate)
                    rest = rest[n:]
                    break
        out[image_key(stem)] = _indices(names, class_set, f"{path}:{lineno}")
    return out


def read_voc_xml(files: list[Path], class_set: ClassSet) -> dict[str, list[int]]:
    """VOC ``Annotations/*.xml``: every ``<object><name>``, difficult ones included; key = file stem.

    Classes come in the order of their first ``<object>``, each once, as the authors' ``label_list``
    (``generate_cams_voc12.py``).
    """
    out = {}
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise LabelsError(f"{f}: invalid XML ({e})") from None
        names = [(o.findtext("name") or "").strip() for o in root.iter("object")]
        out[f.stem] = _indices(names, class_set, str(f))
    return out


def read_labels(path: str | Path, class_set: ClassSet) -> dict[str, list[int]]:
    """Read image-level labels; the format follows from the path (folder of XML, JSON, text)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise LabelsError(f"{path}: no VOC annotation (.xml) files found")
        return read_voc_xml(files, class_set)
    if not path.is_file():
        raise LabelsError(f"--labels {path}: no such file or folder")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabelsError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict) and {"images", "annotations", "categories"} <= data.keys():
            return _read_coco(data, class_set, path)
        if not isinstance(data, dict):
            raise LabelsError(f"{path}: expected a JSON object mapping image names to class lists")
        return _read_json_map(data, class_set, path)
    if path.suffix.lower() == ".xml":
        return read_voc_xml([path], class_set)
    try:
        return _read_text(path, class_set)
    except UnicodeDecodeError as e:
        raise LabelsError(f"{path}: not a UTF-8 text file ({e})") from None

