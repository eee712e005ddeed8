"""Segmentation metrics as the reference computes them: confusion matrix, IoU, mIoU over GT classes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import Progress

from .errors import ClipesError
from .masks import IGNORE, voc_palette
from .pixels import open_image
from .prompts import ClassSet

__all__ = ["Evaluation", "FolderGroundTruth", "Scores", "bar_chart", "check_pair", "confusion", "evaluate",
           "open_ground_truth", "read_label_png", "scores"]


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C + 1) counts: rows ground truth, columns prediction; the last column counts predictions
    outside 0..C-1 (such as 255, unlabelled), which are misses. Ground truth 255 is ignored."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = gt != IGNORE
    if (gt[valid] >= num_classes).any():
        raise ValueError(f"ground truth holds values >= {num_classes} other than 255")
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p = np.where(p < num_classes, p, num_classes)
    return np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


@dataclass
class Scores:
    """Per-class IoU, precision and recall (NaN where undefined), and their summaries."""

    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    present: np.ndarray
    pixel_accuracy: float
    miou: float

    def to_dict(self, names: Iterable[str]) -> dict:
        names = list(names)

        def clean(x: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else round(float(v), 6) for v in x]

        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
                "classes": {n: {"iou": i, "precision": p, "recall": r, "in_ground_truth": bool(g)}
                            for n, i, p, r, g in zip(names, clean(self.iou), clean(self.precision),
                                                     clean(self.recall), self.present, strict=True)}}


def scores(hist: np.ndarray) -> Scores:
    """Metrics from a (C, C + 1) confusion matrix; mIoU averages the classes present in the ground truth."""
    c = hist.shape[0]
    tp = np.diag(hist[:, :c]).astype(np.float64)
    gt = hist.sum(axis=1).astype(np.float64)
    pred = hist[:, :c].sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        precision = tp / pred
        recall = tp / gt
    present = gt > 0
    total = gt.sum()
    return Scores(iou=iou, precision=precision, recall=recall, present=present,
                  pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
                  miou=float(np.mean(iou[present])) if present.any() else float("nan"))


def bar_chart(names: list[str], iou: np.ndarray, title: str, present: np.ndarray | None = None) -> Image.Image:
    """A horizontal bar chart of per-class IoU; classes absent from the ground truth are greyed out."""
    row, label_w, bar_w = 18, 150, 360
    img = Image.new("RGB", (label_w + bar_w + 60, row * (len(names) + 2)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), title, fill="black")
    palette = voc_palette()
    for i, (name, v) in enumerate(zip(names, iou, strict=True)):
        y = row * (i + 1) + 4
        counted = not np.isnan(v) and (present is None or present[i])
        draw.text((6, y + 2), name[:22], fill="black" if counted else "grey")
        if not counted:
            draw.text((label_w, y + 2), "n/a", fill="grey")
            continue
        colour = tuple(int(x) for x in palette[i]) if i else (90, 90, 90)
        draw.rectangle((label_w, y, label_w + int(bar_w * v), y + row - 4), fill=colour)
        draw.text((label_w + int(bar_w * v) + 4, y + 2), f"{100 * v:.1f}", fill="black")
    return img


class FolderGroundTruth:
    """Ground-truth label PNGs (palette or grayscale indices, 255 = void) under a folder, by stem."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ClipesError(f"ground truth {folder} is not a folder")
        self.paths = {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*.png"))}
        if not self.paths:
            raise ClipesError(f"no ground-truth PNGs in {folder}")

    def __contains__(self, stem: str) -> bool:
        return stem in self.paths

    def stems(self) -> list[str]:
        return list(self.paths)

    def known(self) -> list[str]:
        """Every image with ground truth (what a split list may name)."""
        return list(self.paths)

    def mask(self, stem: str) -> np.ndarray:
        return read_label_png(self.paths[stem])

    def where(self, stem: str) -> str:
        """The file holding ``stem``'s ground truth, for messages."""
        return str(self.paths[stem])


def read_label_png(path: Path) -> np.ndarray:
    """A label map (uint8) from a palette or single-channel PNG; a clear error for colour images and for
    16-bit or 32-bit values no 8-bit label map holds (casting would read 264 as class 8)."""
    try:
        with open_image(path) as img:
            if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise ClipesError(f"{path}: expected a palette or grayscale label PNG, got mode {img.mode}")
            arr = np.asarray(img)
    except OSError as e:
        raise ClipesError(f"{path}: cannot read label PNG ({e})") from e
    if arr.dtype != np.uint8:
        outside = arr[(arr < 0) | (arr > 255)]
        if outside.size:
            raise ClipesError(f"{path}: holds label value {int(outside.flat[0])}, outside 0-255 (classes 0-254, "
                              "255 void); save it as an 8-bit palette or grayscale PNG of class indices")
    return arr.astype(np.uint8)


def _size(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def check_pair(pred: np.ndarray, truth: np.ndarray, num_classes: int, pred_where: str, gt_where: str) -> None:
    """A ClipesError naming the files when a prediction and its ground truth cannot be compared: sizes
    differ (with a hint when they are the same size turned, as for EXIF-rotated photos), or the ground
    truth holds a value that is neither a class of the set nor 255."""
    if pred.shape != truth.shape:
        hint = ("; the same size turned 90 degrees: the photo has an EXIF orientation its ground truth does "
                "not follow, so label it with clipes label --ignore-exif" if pred.shape == truth.shape[::-1] else "")
        raise ClipesError(f"prediction {pred_where} is {_size(pred)} but ground truth {gt_where} is "
                          f"{_size(truth)}{hint}")
    outside = truth[(truth != IGNORE) & (truth >= num_classes)]
    if outside.size:
        raise ClipesError(f"{gt_where}: ground-truth value {int(outside.max())} is not a class: the class set has "
                          f"{num_classes} values (0 background to {num_classes - 1}) and 255 (void); "
                          "is --classes right?")


def open_ground_truth(spec: Path, class_set: ClassSet):
    """A folder of label PNGs, or a COCO instances JSON rasterised on the fly."""
    if spec.suffix.lower() == ".json":
        from .datasets import CocoGroundTruth

        return CocoGroundTruth(spec, class_set)
    return FolderGroundTruth(spec)


@dataclass
class Evaluation:
    """A dataset-level confusion matrix, per-image mIoU, and the images left out (with why)."""

    hist: np.ndarray
    per_image: dict[str, float]
    missing: list[str]

    @property
    def scores(self) -> Scores:
        return scores(self.hist)


def evaluate(predict, gt, stems: list[str], num_classes: int, progress: Progress | None = None,
             pred_where=lambda stem: repr(stem)) -> Evaluation:
    """Accumulate ``confusion(predict(stem), gt.mask(stem))``; ``predict`` returns None when absent.

    ``pred_where(stem)`` names a prediction in the error for a pair that cannot be compared.
    """
    hist = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    per_image, missing = {}, []
    task = progress.add_task("evaluating", total=len(stems)) if progress else None
    for stem in stems:
        pred = predict(stem)
        if pred is None:
            missing.append(stem)
        else:
            truth = gt.mask(stem)
            check_pair(pred, truth, num_classes, pred_where(stem), gt.where(stem))
            h = confusion(pred, truth, num_classes)
            hist += h
            per_image[stem] = scores(h).miou
        if progress is not None:
            progress.advance(task)
    return Evaluation(hist, per_image, missing)
