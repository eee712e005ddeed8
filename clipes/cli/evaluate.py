"""``clipes eval``: mIoU of predicted or pseudo masks against ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ..errors import ClipesError
from ..evaluate import bar_chart, evaluate, open_ground_truth, read_label_png
from ..masks import pseudo_mask
from ..prompts import ClassSet, load_class_set
from .common import reported_errors


def _class_set(pred: Path, classes: str | None, gt: Path) -> ClassSet:
    manifest = pred / "manifest.json"
    if classes is None and manifest.is_file():
        saved = json.loads(manifest.read_text()).get("settings", {}).get("classes", {})
        if saved.get("name") in ("voc", "coco"):
            return load_class_set(saved["name"])
    return load_class_set(classes or ("coco" if gt.suffix.lower() == ".json" else "voc"))


def _mask_reader(folder: Path):
    def predict(stem: str) -> np.ndarray | None:
        path = folder / f"{stem}.png"
        return read_label_png(path) if path.is_file() else None
    return predict


def _cam_reader(folder: Path, power: float):
    def predict(stem: str) -> np.ndarray | None:
        path = folder / f"{stem}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            cams, labels = torch.from_numpy(data["cam_refined"]), torch.from_numpy(data["labels"])
        return pseudo_mask(cams, labels, power).numpy()
    return predict


def _report(console: Console, names: list[str], ev, title: str) -> None:
    sc = ev.scores
    table = Table(title=title)
    for col in ("class", "IoU", "precision", "recall"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, i, p, r, g in zip(names, sc.iou, sc.precision, sc.recall, sc.present, strict=True):
        fmt = lambda v: "-" if np.isnan(v) else f"{100 * v:.1f}"  # noqa: E731
        table.add_row(name if g else f"[dim]{name} (not in GT)[/]", fmt(i), fmt(p), fmt(r))
    table.add_section()
    table.add_row("[bold]mIoU", f"[bold]{100 * sc.miou:.2f}", "", "")
    table.add_row("pixel accuracy", f"{100 * sc.pixel_accuracy:.2f}", "", "")
    console.print(table)


def eval_command(
    pred: Annotated[Path, typer.Argument(help="Folder of label PNGs, or a clipes output folder (uses masks/).")],
    gt: Annotated[Path, typer.Argument(help="Folder of ground-truth PNGs (255 = void) or a COCO instances JSON.")],
    classes: Annotated[str | None, typer.Option(
        help="Class set for names and class count \\[default: the run's, else voc; coco for a JSON].")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bar chart of per-class IoU (PNG) here.")] = None,
    search_bg_power: Annotated[str | None, typer.Option(
        help="Comma-separated background powers t to try on the run's saved CAMs (cams/, --save-cams); "
             "the reference searches 1,2.")] = None,
) -> None:
    """Score masks against ground truth: per-class IoU, mIoU, pixel accuracy, precision and recall."""
    console = Console(stderr=True)
    with reported_errors(console):
        class_set = _class_set(pred, classes, gt)
        names = ["background", *class_set.classes]
        truth = open_ground_truth(gt, class_set)
        is_run = (pred / "masks").is_dir()
        stems = truth.stems()
        results = {}
        with Progress(console=console, transient=True) as progress:
            if search_bg_power:
                if not (pred / "cams").is_dir():
                    raise ClipesError(f"{pred}/cams not found: --search-bg-power needs a run made with --save-cams")
                powers = [float(t) for t in search_bg_power.split(",")]
                for t in powers:
                    results[t] = evaluate(_cam_reader(pred / "cams", t), truth, stems, len(names), progress)
                best = max(results, key=lambda t: results[t].scores.miou)
                ev = results[best]
            else:
                ev = evaluate(_mask_reader(pred / "masks" if is_run else pred), truth, stems, len(names), progress)
        if not ev.per_image:
            raise ClipesError(f"no prediction in {pred} matches a ground-truth image in {gt}")

    if search_bg_power:
        table = Table(title="background power search")
        table.add_column("t", justify="right")
        table.add_column("mIoU", justify="right")
        for t, r in results.items():
            table.add_row(f"{t:g}", f"{100 * r.scores.miou:.2f}" + (" (best)" if t == best else ""))
        console.print(table)
    title = f"{len(ev.per_image)} image(s), {pred}" + (f", t = {best:g}" if search_bg_power else "")
    _report(console, names, ev, title)
    if ev.missing:
        console.print(f"[yellow]{len(ev.missing)} ground-truth image(s) have no prediction[/] (not scored): "
                      + escape(", ".join(ev.missing[:5])) + (" ..." if len(ev.missing) > 5 else ""))
    report = {**ev.scores.to_dict(names), "images": len(ev.per_image), "missing": ev.missing,
              "per_image_miou": ev.per_image, "prediction": str(pred), "ground_truth": str(gt)}
    if search_bg_power:
        report["bg_power_search"] = {f"{t:g}": r.scores.miou for t, r in results.items()}
        report["bg_power"] = best
    json_out = json_out or (pred / "eval.json" if is_run else None)
    plot = plot or (pred / "eval_iou.png" if is_run else None)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        bar_chart(names, ev.scores.iou, f"per-class IoU, mIoU {100 * ev.scores.miou:.2f}", ev.scores.present).save(plot)
    target = f" -> {escape(str(json_out))}" if json_out else ""
    console.print(f"mIoU {100 * ev.scores.miou:.2f}{target}", highlight=False)
