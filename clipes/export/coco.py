"""A run's masks as a COCO-style instances JSON: one RLE annotation per (image, class present).

detectron2, mmdet, FiftyOne, CVAT ("COCO 1.0") and Label Studio's converters read it. RLE comes
from ``pycocotools.mask``; pixels the run ignores (255) belong to no class annotation, and can be
written as crowd annotations of an extra ``ignore`` category.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from ..defaults import MIN_AREA
from ..errors import ClipesError
from ..masks import IGNORE
from ..prompts import load_class_set
from .runfolder import ExportRun

__all__ = ["COCO_CATEGORY_IDS", "IGNORE_CATEGORY", "MIN_AREA", "category_ids", "check_min_area", "coco_json"]

# COCO's own category ids of its 80 classes, in the class set's (standard) order: 1-90 with gaps
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)
IGNORE_CATEGORY = "ignore"
_STACK_BYTES = 64 << 20


def category_ids(run: ExportRun) -> list[int]:
    """The category id of each class: COCO's own for the coco class set, else 1..K."""
    if run.class_set.classes == load_class_set("coco").classes:
        return list(COCO_CATEGORY_IDS)
    return list(range(1, len(run.class_set) + 1))


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as e:
        raise ClipesError("--format coco needs pycocotools: pip install 'clipes[coco]'") from e
    return mask_api


def _regions(binary: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """The 8-connected regions of a boolean map (scipy.ndimage): their label map (region k is k + 1) and boxes."""
    try:
        from scipy import ndimage
    except ImportError as e:
        raise ClipesError("--instances needs scipy: pip install 'clipes[coco]'") from e
    regions, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    return regions, ndimage.find_objects(regions)


def check_min_area(fmt: str, instances: bool, min_area: int | None) -> None:
    """``--min-area`` is a count of pixels, and only ``--format coco --instances`` has regions to drop."""
    if min_area is None:
        return
    if min_area < 0:
        raise ClipesError(f"--min-area {min_area}: a number of pixels, 0 or more")
    if fmt != "coco" or not instances:
        raise ClipesError("--min-area goes with --format coco --instances (it drops the smallest regions)")


def _large_regions(regions: np.ndarray, boxes: list, min_area: int) -> list[tuple[int, tuple[slice, slice]]]:
    """(region key, box) of the regions of at least ``min_area`` pixels."""
    sizes = np.bincount(regions.ravel(), minlength=len(boxes) + 1)
    return [(k + 1, box) for k, box in enumerate(boxes) if sizes[k + 1] >= min_area]


def _annotations(mask: np.ndarray, ids: list[int], ignore_id: int | None, instances: bool, mask_api,
                 min_area: int = 0):
    """(category id, iscrowd, RLE, area, bbox) of every class region of one mask (and its ignored region);
    with ``instances``, regions under ``min_area`` pixels are left out."""
    # each part: category, iscrowd, and where it is: pixels of ``where`` equal to ``key`` inside ``box``
    parts: list[tuple[int, int, np.ndarray, int, tuple[slice, slice]]] = []
    whole = (slice(None), slice(None))
    for value in np.unique(mask).tolist():
        if value == 0 or (value == IGNORE and ignore_id is None):
            continue
        if value == IGNORE:
            parts.append((ignore_id, 1, mask, value, whole))
        elif instances:
            regions, boxes = _regions(mask == value)
            parts += [(ids[value - 1], 0, regions, key, box) for key, box in _large_regions(regions, boxes, min_area)]
        else:
            parts.append((ids[value - 1], 0, mask, value, whole))
    if not parts:
        return []
    # (H, W, n) Fortran-ordered stacks, as pycocotools encodes them, of at most _STACK_BYTES each (a CRF
    # mask can hold hundreds of regions); a region is copied within its box only
    rles = []
    step = max(1, _STACK_BYTES // mask.size)
    for first in range(0, len(parts), step):
        chunk = parts[first:first + step]
        stack = np.zeros((*mask.shape, len(chunk)), dtype=np.uint8, order="F")
        for j, (_, _, where, key, box) in enumerate(chunk):
            stack[(*box, j)] = where[box] == key
        rles += mask_api.encode(stack)
    areas, boxes = mask_api.area(rles), mask_api.toBbox(rles)
    return [(cat, crowd, {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
             int(area), [float(v) for v in box])
            for (cat, crowd, *_), rle, area, box in zip(parts, rles, areas, boxes, strict=True)]


def coco_json(run: ExportRun, *, instances: bool = False, ignore_category: bool = False, min_area: int | None = None,
              advance: Callable[[], None] = lambda: None) -> dict:
    """The COCO dataset dict of ``run``: ``images`` (ids 1..N by stem), ``categories``, ``annotations``.

    ``instances`` splits each class into its 8-connected regions, one annotation each, of at least
    ``min_area`` pixels (None: ``MIN_AREA``);
    ``ignore_category`` adds the ignored pixels (255) as crowd annotations of an ``ignore`` category.
    """
    mask_api = _mask_api()
    names, ids = run.class_set.classes, category_ids(run)
    categories = [{"id": i, "name": n} for i, n in zip(ids, names, strict=True)]
    ignore_id = None
    if ignore_category:
        if any(n.lower() == IGNORE_CATEGORY for n in names):
            raise ClipesError(f"--ignore-category: the class set {run.class_set.name!r} has a class named "
                              f"{IGNORE_CATEGORY!r} already")
        ignore_id = max(ids) + 1
        categories.append({"id": ignore_id, "name": IGNORE_CATEGORY})
    images, annotations = [], []
    for image_id, (image, mask) in enumerate(run.masks(), 1):
        height, width = mask.shape
        images.append({"id": image_id, "file_name": image.file, "height": height, "width": width})
        for cat, crowd, rle, area, box in _annotations(mask, ids, ignore_id, instances, mask_api,
                                                       MIN_AREA if min_area is None else min_area):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "segmentation": rle, "area": area, "bbox": box, "iscrowd": crowd})
        advance()
    try:
        tool = f"clipes {version('clipes')}"
    except PackageNotFoundError:
        tool = "clipes"
    info = {"description": f"pseudo masks of the clipes run {run.root.name}", "contributor": tool,
            "images_root": str(run.input)}
    return {"info": info, "images": images, "categories": categories, "annotations": annotations}
