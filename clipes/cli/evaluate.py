"""``clipes eval``: mIoU of predicted or pseudo masks against ground truth."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ClipesError
from ..splits import eval_split, scoped_stems
from .common import make_console, positive_floats, reported_errors, run_class_set, write_output

# clipes.evaluate, clipes.masks and clipes.output are imported where used, so that --help and usage errors come
# back at once; none of them loads torch (numpy does eval's work)


class _Masks:
    """Predicted label PNGs ``<folder>/<stem>.png``; None for a stem without one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def where(self, stem: str) -> str:
        return str(self.folder / f"{stem}.png")

    def __call__(self, stem: str) -> np.ndarray | None:
        from ..evaluate import read_label_png

        path = self.folder / f"{stem}.png"
        return read_label_png(path) if path.is_file() else None


# the two ways the reference scores background from saved CAMs (eval_cam.py): a power of 1 - max, or a constant;
# each a numpy function of clipes.masks
_BACKGROUND = {"power": ("background power", "pseudo_mask_np"),
               "threshold": ("background threshold", "threshold_mask_np")}


class _Cams(_Masks):
    """Masks made from a run's saved CAMs (``cams/<stem>.npz``): background power or threshold ``value``."""

    def __init__(self, folder: Path, mode: str, value: float) -> None:
        from .. import masks

        super().__init__(folder)
        self.name, make = _BACKGROUND[mode]
        self.make = getattr(masks, make)
        self.value = value

    def where(self, stem: str) -> str:
        return f"{self.folder / f'{stem}.npz'} ({self.name} {self.value:g})"

    def __call__(self, stem: str) -> np.ndarray | None:
        path = self.folder / f"{stem}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                cams, labels = data["cam_refined"], data["labels"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            why = "not an .npz archive" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
            raise ClipesError(f"{path}: cannot read saved CAMs ({why}); delete it and rerun "
                              "clipes label --save-cams") from None
        if cams.ndim != 3 or labels.ndim != 1 or len(cams) != len(labels) or not np.isfinite(cams).all():
            raise ClipesError(f"{path}: 'cam_refined' {cams.shape} and 'labels' {labels.shape} are not one finite "
                              "map per label; delete it and rerun clipes label --save-cams")
        return self.make(cams, labels.astype(np.int64), self.value)


def _no_nan(value):
    """JSON has no NaN: undefined scores (no ground-truth pixel) are written as null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _powers(value: str | None) -> str | None:
    if value is not None:
        positive_floats(value)
    return value


def _thresholds(value: str | None) -> str | None:
    if value is not None and any(t >= 1 for t in positive_floats(value)):
        raise typer.BadParameter(f"{value!r}: background thresholds are CAM scores, each in (0, 1)")
    return value


def _report(console: Console, names: list[str], ev, title: str) -> None:
    sc = ev.scores
    table = Table(title=title)
    for col in ("class", "IoU %", "precision %", "recall %"):  # scores are fractions; shown as percentages
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, i, p, r, g in zip(names, sc.iou, sc.precision, sc.recall, sc.present, strict=True):
        fmt = lambda v: "-" if np.isnan(v) else f"{100 * v:.1f}"  # noqa: E731
        table.add_row(name if g else f"[dim]{name} (not in GT)[/]", fmt(i), fmt(p), fmt(r))
    table.add_section()
    table.add_row("[bold]mIoU", f"[bold]{100 * sc.miou:.2f}%", "", "")
    table.add_row("pixel accuracy", f"{100 * sc.pixel_accuracy:.2f}%", "", "")
    console.print(table)


def _names(stems: list[str]) -> str:
    return escape(", ".join(stems[:5])) + (" ..." if len(stems) > 5 else "")


def _say_scope(console: Console, scope, listed: int, missing: list[str], unscored: list[str]) -> None:
    """How many images were scored of which set, which had no prediction, which predictions were not scored."""
    if scope.stems is not None:
        console.print(f"scored {listed - len(missing)} of the {listed} image(s) of {escape(str(scope.source))}"
                      + (f" ({scope.repeated} repeated line(s) taken once)" if scope.repeated else ""),
                      highlight=False)
    if missing:
        console.print(f"[yellow]{len(missing)} {'listed' if scope.stems is not None else 'ground-truth'} image(s) "
                      f"have no prediction[/] (not scored): {_names(missing)}")
    if unscored:
        why = "are outside the split" if scope.stems is not None else "have no ground truth"
        console.print(f"[yellow]{len(unscored)} prediction(s) {why}[/] (not scored): {_names(unscored)}")


def eval_command(
    pred: Annotated[Path, typer.Argument(help="Folder of label PNGs, or a clipes output folder (uses masks/).")],
    gt: Annotated[Path, typer.Argument(help="Folder of ground-truth PNGs (255 = void) or a COCO instances JSON; with "
                                            "--dataset, the dataset root.")],
    classes: Annotated[str | None, typer.Option(
        help="Class set for names and class count \\[default: the run's, else voc; coco for a JSON].")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bar chart of per-class IoU (PNG) here.")] = None,
    search_bg_power: Annotated[str | None, typer.Option(
        help="Comma-separated background powers t > 0 to try on the run's saved CAMs (cams/, --save-cams); "
             "the reference searches 1,2.", callback=_powers)] = None,
    search_bg_threshold: Annotated[str | None, typer.Option(
        help="Comma-separated constant background scores in (0, 1) to try on the saved CAMs instead (the "
             "reference's other mode searches 0.05,0.1,...,0.6).", callback=_thresholds)] = None,
    dataset: Annotated[str | None, typer.Option(
        help="voc or coco: GT is the dataset root; score the images of --split against its ground truth "
             "(VOC: SegmentationClass\\[Aug]; COCO: instances_<split>2014.json).")] = None,
    split: Annotated[str | None, typer.Option(help="With --dataset: the split to score \\[val].")] = None,
    split_file: Annotated[Path | None, typer.Option(
        help="Score only the images this list names, one per line (the authors' list files; first word, folders "
             "and suffix dropped) \\[default: every ground-truth image].")] = None,
) -> None:
    """Score masks against ground truth: per-class IoU, mIoU, pixel accuracy, precision and recall."""
    from PIL import Image
    from rich.progress import Progress

    from ..evaluate import bar_chart, evaluate, open_ground_truth
    from ..output import check_not_inputs, encode_image, named_file

    console = make_console()
    with reported_errors(console):
        if not pred.is_dir():
            raise ClipesError(f"{pred} is not a folder of predictions")
        scope = eval_split(gt, dataset, split, split_file)
        gt = scope.ground_truth
        class_set = run_class_set(pred, classes, "coco" if gt.suffix.lower() == ".json" else "voc")
        names = ["background", *class_set.classes]
        truth = open_ground_truth(gt, class_set)
        if getattr(truth, "left_out", 0) and scope.stems is None:
            console.print(f"{truth.left_out} image(s) of {escape(str(gt))} have no object and are not scored, as in "
                          "the authors' lists", highlight=False)
        is_run = (pred / "masks").is_dir()
        json_out = json_out or (pred / "eval.json" if is_run else None)
        plot = plot or (pred / "eval_iou.png" if is_run else None)
        read = pred / ("cams" if search_bg_power or search_bg_threshold else "masks") if is_run else pred
        check_not_inputs({"--json": json_out, "--plot": plot},
                         {"PRED": read, "GT": gt, "--classes": named_file(classes), "PRED's manifest": pred /
                          "manifest.json" if is_run else None, "--split-file": split_file})
        stems = truth.stems() if scope.stems is None else scoped_stems(scope.stems, truth.known(), str(gt),
                                                                        str(scope.source))
        results = {}
        if search_bg_power and search_bg_threshold:
            raise ClipesError("--search-bg-power and --search-bg-threshold are two ways to score background: "
                              "give one")
        mode, flag, search = ("power", "--search-bg-power", search_bg_power) if search_bg_power else \
            ("threshold", "--search-bg-threshold", search_bg_threshold)
        with Progress(console=console, transient=True) as progress:
            if search:
                if not (pred / "cams").is_dir():
                    raise ClipesError(f"{pred}/cams not found: {flag} needs a run made with --save-cams")
                for t in positive_floats(search):
                    reader = _Cams(pred / "cams", mode, t)
                    results[t] = evaluate(reader, truth, stems, len(names), progress, reader.where)
                best = max(results, key=lambda t: results[t].scores.miou)
                ev = results[best]
            else:
                reader = _Masks(pred / "masks" if is_run else pred)
                ev = evaluate(reader, truth, stems, len(names), progress, reader.where)
        if not ev.per_image:
            raise ClipesError(f"no prediction in {pred} matches a ground-truth image in {gt}")
        folder = reader.folder
        suffix = ".npz" if search else ".png"
        scored = set(stems)
        unscored = sorted(stem for f in folder.rglob(f"*{suffix}")
                          if (stem := f.relative_to(folder).with_suffix("").as_posix()) not in scored)

    symbol = "t" if mode == "power" else "threshold"
    if search:
        table = Table(title=f"background {mode} search")
        table.add_column(symbol, justify="right")
        table.add_column("mIoU", justify="right")
        for t, r in results.items():
            table.add_row(f"{t:g}", f"{100 * r.scores.miou:.2f}%" + (" (best)" if t == best else ""))
        console.print(table)
    title = f"{len(ev.per_image)} image(s), {pred}" + (f", {symbol} = {best:g}" if search else "")
    _report(console, names, ev, title)
    _say_scope(console, scope, len(stems), ev.missing, unscored)
    report = {**ev.scores.to_dict(names), "images": len(ev.per_image), "missing": ev.missing,
              "without_ground_truth": [] if scope.stems is not None else unscored,
              "per_image_miou": ev.per_image, "prediction": str(pred), "ground_truth": str(gt)}
    if scope.stems is not None:
        report["split"] = {"source": scope.source, "listed": len(stems), "scored": len(ev.per_image),
                           "outside_split": unscored}
    if search:
        report[f"bg_{mode}_search"] = {f"{t:g}": r.scores.miou for t, r in results.items()}
        report[f"bg_{mode}"] = best
    with reported_errors(console):
        if json_out:
            write_output(json_out, (json.dumps(_no_nan(report), indent=1, allow_nan=False) + "\n").encode(), "--json")
        if plot:
            chart = bar_chart(names, ev.scores.iou, f"per-class IoU, mIoU {100 * ev.scores.miou:.2f}%",
                              ev.scores.present)
            fmt = Image.registered_extensions().get(plot.suffix.lower(), "PNG")
            write_output(plot, encode_image(chart.convert("RGB") if fmt == "JPEG" else chart, fmt), "--plot")
    target = f" -> {escape(str(json_out))}" if json_out else ""
    console.print(f"mIoU {100 * ev.scores.miou:.2f}%{target}", highlight=False)
