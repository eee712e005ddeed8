"""``clipes tag``: image-level labels from class names alone (TagCLIP), optionally scored against ground truth."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..defaults import MODEL_ENV
from ..errors import ClipesError
from .common import MIN_MAX_SIDE, finite, make_console, max_side_option, reported_errors, write_output

if TYPE_CHECKING:  # the command imports them when it runs: --help comes back before torch loads
    import torch

    from ..prompts import ClassSet
    from ..tagging.folder import TagRun
    from ..tagging.metrics import TagMetrics

__all__ = ["tag_command"]


def _inputs(images: Path | None, classes: str, dataset: str | None, root: Path | None, split: str
            ) -> tuple[Path, list[tuple[str, Path]], ClassSet, dict[str, list[int]] | None]:
    """The input folder, its images (stem, path), the class set and the dataset's labels, if any."""
    from ..datasets import load_split
    from ..images import find_images
    from ..prompts import load_class_set

    if dataset is None:
        if root is not None:
            raise ClipesError("--root goes with --dataset voc|coco")
        if images is None:
            raise ClipesError("give a folder of images, or --dataset voc|coco --root ROOT --split SPLIT")
        return images, find_images(images), load_class_set(classes), None
    if images is not None:
        raise ClipesError(f"--dataset {dataset} takes its images from --root and --split; drop {images}")
    if root is None:
        raise ClipesError(f"--dataset {dataset} needs --root, the dataset's folder")
    if classes not in ("voc", dataset):
        raise ClipesError(f"--dataset {dataset} comes with its own class set; drop --classes {classes}")
    split_data = load_split(dataset, root, split)
    return root, split_data.items, split_data.class_set, split_data.labels


def _truth(tagged: TagRun, gt: dict[str, list[int]], num_classes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(n, C) scores and 0/1 truth of the tagged images that have ground truth, and how many have none."""
    import torch

    stems = [s for s in sorted(tagged.tagged) if s in gt or s.rsplit("/", 1)[-1] in gt]
    if not stems:
        raise ClipesError("no tagged image has an entry in the ground truth (matched by file stem)")
    truth = torch.zeros((len(stems), num_classes))
    for i, s in enumerate(stems):
        truth[i, gt[s] if s in gt else gt[s.rsplit("/", 1)[-1]]] = 1
    scores = torch.stack([tagged.tagged[s].scores for s in stems])
    return scores, truth, len(tagged.tagged) - len(stems)


def _report(console: Console, metrics: TagMetrics, title: str) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("AP", justify="right")
    for name, ap in metrics.ap.items():
        table.add_row(escape(name), "-" if ap is None else f"{100 * ap:.2f}")
    table.add_section()
    table.add_row("[bold]mAP[/]", f"[bold]{100 * metrics.mean_ap:.2f}[/]")
    if not math.isclose(metrics.mean_ap, metrics.mean_ap_all_classes):
        table.add_row("mAP, absent classes as 0", f"{100 * metrics.mean_ap_all_classes:.2f}")
    table.add_row("F1 (overall)", f"{100 * metrics.f1:.2f}")
    table.add_row("precision (overall)", f"{100 * metrics.precision:.2f}")
    table.add_row("recall (overall)", f"{100 * metrics.recall:.2f}")
    console.print(table)


def tag_command(
    images: Annotated[Path | None, typer.Argument(
        help="Folder of images (searched recursively; never written to).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Labels file to write (JSON), readable by "
                                                           "'clipes label --labels'.")] = Path("tags.json"),
    classes: Annotated[str, typer.Option(help="Class set: voc, coco, or a YAML / text file.")] = "voc",
    tagger: Annotated[str, typer.Option(
        help="Tagging method: tagclip (TagCLIP) or global (CLIP's CLS embedding against every class and background "
             "prompt).")] = "tagclip",
    zero_shot_threshold: Annotated[float | None, typer.Option(
        help="With --tagger global: the softmax score (in \\[0, 1]) a class needs to count as present; an image "
             "with no class above it keeps its best one \\[default: 0.1].", show_default=False,
        callback=finite(0, 1))] = None,
    gt: Annotated[Path | None, typer.Option(
        help="Ground-truth image-level labels (any format --labels reads) to score the tags against.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="voc or coco: tag the images of --root / --split and score them against its labels.")] = None,
    root: Annotated[Path | None, typer.Option(help="The dataset's folder, with --dataset.")] = None,
    split: Annotated[str, typer.Option(help="Dataset split (voc: val, train, ...; coco: val, train).")] = "val",
    metrics_out: Annotated[Path | None, typer.Option(
        "--metrics", help="Where to write the metrics JSON \\[default: OUT with suffix .metrics.json].",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        envvar=MODEL_ENV, help="open_clip ARCH/TAG, hf-hub:ID, a checkpoint path, ARCH:PATH, or a "
                               "transformers CLIP folder or hub ID (org/name) \\[default: ViT-B-16/openai].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_side: Annotated[int, typer.Option(
        help=f"Larger images are scaled down to this longer side for the network; 0 disables, else at least "
             f"{MIN_MAX_SIDE}.", callback=max_side_option)] = 1024,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Images per batch (same input size) \\[default: 32 on a GPU, 4 on the CPU].",
        show_default=False)] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes decoding images.")] = 1,
    ignore_exif: Annotated[bool, typer.Option(
        "--ignore-exif", help="Use the stored pixel order instead of the EXIF orientation.")] = False,
) -> None:
    """Tag images with the classes they show (TagCLIP, no labels needed) and write a labels file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..labels import read_labels
    from ..model import load_clip, resolve_device
    from ..output import check_not_inputs, check_writable, named_file
    from ..tagging import make_tagger, tagger_settings
    from ..tagging.folder import labels_file_bytes, tag_images
    from ..tagging.metrics import tag_metrics

    console = make_console()
    with reported_errors(console):
        if zero_shot_threshold is not None and tagger != "global":
            raise ClipesError(f"--zero-shot-threshold goes with --tagger global; {tagger} sets its own threshold "
                              "per image")
        threshold = 0.1 if zero_shot_threshold is None else zero_shot_threshold
        folder, items, class_set, truth = _inputs(images, classes, dataset, root, split)
        tagger_settings(tagger, class_set, threshold)
        if gt is not None:
            if truth is not None:
                raise ClipesError(f"--dataset {dataset} brings its own ground truth; drop --gt")
            truth = read_labels(gt, class_set)
        metrics_path = metrics_out or out.with_suffix(".metrics.json")
        if out.is_dir():
            raise ClipesError(f"--out {out} is a folder; give a file name such as {out / 'tags.json'}")
        check_not_inputs({"--out": out, "--metrics": metrics_path if truth is not None else None},
                         {"the input folder": folder, "--gt": gt, "--classes": named_file(classes),
                          "--model": named_file(model)})
        check_writable(out.parent)  # before minutes of tagging, not after
        dev = resolve_device(device)
        clip = load_clip(model, device=dev)
        method = make_tagger(tagger, clip, class_set, threshold)
        start = time.perf_counter()
        with Progress(TextColumn("[bold]tagging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task("tag", total=len(items))
            run = tag_images(method, items, batch_size=batch_size or (32 if dev.type == "cuda" else 4),
                             max_side=max_side or None, exif_transpose=not ignore_exif and not dataset,
                             workers=workers,
                             advance=lambda n: progress.advance(task, n))
        seconds = time.perf_counter() - start
        if not run.tagged:
            for _path, why in run.failed:
                console.print(f"[yellow]skipped[/] {escape(why)}", highlight=False)
            raise ClipesError(f"no image of {folder} could be tagged ({len(run.failed)} skipped); nothing written")
        write_output(out, labels_file_bytes(run, class_set.classes), "--out")
    console.print(f"tagged {len(run.tagged)} image(s) in {seconds:.1f}s "
                  f"({len(run.tagged) / max(seconds, 1e-9):.2f} img/s), {len(run.failed)} skipped -> "
                  f"{escape(str(out))}", highlight=False)
    for _path, why in run.failed:
        console.print(f"[yellow]skipped[/] {escape(why)}", highlight=False)
    if truth is None:
        return
    with reported_errors(console):
        scores, onehot, without = _truth(run, truth, len(class_set))
        metrics = tag_metrics(scores, onehot, class_set.classes)
        report = {"tagger": tagger_settings(tagger, class_set, threshold), "classes": class_set.name,
                  "labels": str(out), "images_without_ground_truth": without, **metrics.to_dict()}
        write_output(metrics_path, (json.dumps(report, indent=1) + "\n").encode(), "--metrics")
    _report(make_console(stderr=False), metrics, f"{tagger} on {metrics.images} image(s)")
    if without:
        console.print(f"[yellow]{without} tagged image(s) have no ground truth[/] (not scored)", highlight=False)
    console.print(f"mAP {100 * metrics.mean_ap:.2f}, F1 {100 * metrics.f1:.2f} -> {escape(str(metrics_path))}",
                  highlight=False)
