"""``clipes prompts``: rank prompt templates by sharpness on your own images; show the prompts CLIP sees."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..defaults import MODEL_ENV
from ..errors import ClipesError
from ..prompts import ClassSet
from .common import (
    MIN_MAX_SIDE,
    CamOption,
    GetamStartOption,
    batch_size_option,
    make_console,
    max_side_option,
    reported_errors,
    write_output,
)

if TYPE_CHECKING:  # the commands import the rest when they run: --help comes back before torch loads
    from ..prompt_selection import TemplateScore

app = typer.Typer(help="Prompt templates: rank them on your images by sharpness; show the prompts CLIP sees.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@dataclass
class _Inputs:
    """What ``rank`` works on: the image root, (stem, path) items, the class set, labels, ground truth."""

    root: Path
    items: list[tuple[str, Path]]
    class_set: ClassSet
    labels: dict[str, list[int]]
    gt: Path | None


def _inputs(images: Path | None, root: Path | None, dataset: str | None, split: str, classes: str,
            labels: Path | None, gt: Path | None) -> _Inputs:
    from ..datasets import load_split
    from ..images import find_images
    from ..labels import read_labels
    from ..prompts import load_class_set

    if dataset:
        folder = root or images
        if folder is None:
            raise ClipesError(f"--dataset {dataset} needs the dataset folder: --root DIR (or IMAGES)")
        if classes not in ("voc", dataset):
            raise ClipesError(f"--dataset {dataset} comes with its own class set; drop --classes {classes}")
        split_data = load_split(dataset, folder, split)
        given = read_labels(labels, split_data.class_set) if labels else split_data.labels
        return _Inputs(folder, split_data.items, split_data.class_set, given,
                       gt or split_data.gt_dir or split_data.coco_json)
    if images is None:
        raise ClipesError("give a folder of images, or --dataset voc|coco with --root")
    if labels is None:
        raise ClipesError("sharpness needs image-level labels: give --labels FILE (or --dataset voc|coco)")
    class_set = load_class_set(classes)
    return _Inputs(images, find_images(images), class_set, read_labels(labels, class_set), gt)


def _check_output(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    from ..output import check_writable

    if path.suffix.lower() not in suffixes:
        raise ClipesError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ClipesError(f"{flag} {path} is a folder; give a file name")
    try:
        check_writable(path.parent)  # before the model and every image, not after
    except ClipesError as e:
        raise ClipesError(f"{flag} {path}: {e}") from None


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _table(ranked: list[TemplateScore], current: tuple[str, ...], show: int, validated: bool) -> Table:
    table = Table(title=f"{len(ranked)} templates, lower sharpness first")
    for col in ("rank", "template", "sharpness", "images", *(("mIoU %",) if validated else ())):
        table.add_column(col, justify="left" if col == "template" else "right")
    shown = [i for i, r in enumerate(ranked) if not show or i < show or r.template in current]
    for before, i in zip([-1, *shown], shown, strict=False):
        r = ranked[i]
        if i != before + 1:  # rows left out above
            table.add_section()
        mark = " [dim](class set's)[/]" if r.template in current else ""
        miou = ("-" if r.miou is None else f"{100 * r.miou:.2f}",) if validated else ()
        table.add_row(str(i + 1), escape(r.template) + mark, f"{r.sharpness:.6g}", str(r.images), *miou)
    return table


@app.command("rank")
def rank_command(
    images: Annotated[Path | None, typer.Argument(
        help="Folder of images (searched recursively; never written to), or the dataset root with --dataset.")
    ] = None,
    labels: Annotated[Path | None, typer.Option(
        help="Image-level labels (JSON map, 'stem class ...' text, VOC Annotations/ or COCO instances JSON); "
             "only images with two or more labels are scored.")] = None,
    classes: Annotated[str, typer.Option(help="Class set: voc, coco, or a YAML / text file.")] = "voc",
    templates: Annotated[Path | None, typer.Option(
        help="Your own candidate templates, one per line, each with one '{}' for the class name; added to "
             "CLIP's 80 ImageNet templates and the class set's own.")] = None,
    imagenet: Annotated[bool, typer.Option(
        "--imagenet/--no-imagenet", help="Include CLIP's 80 ImageNet templates among the candidates.")] = True,
    model: Annotated[str | None, typer.Option(
        envvar=MODEL_ENV, help="open_clip ARCH/TAG, hf-hub:ID, a checkpoint path, ARCH:PATH, or a "
                               "transformers CLIP folder or hub ID (org/name) \\[default: ViT-B-16/openai].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[str, typer.Option(
        help="Images per batch (same input size), or 'auto': 32 on a GPU, 4 on the CPU.",
        callback=batch_size_option)] = "auto",
    workers: Annotated[int | None, typer.Option(
        help="DataLoader processes decoding images \\[default: up to 8 per GPU, 1 on the CPU].",
        show_default=False, min=0)] = None,
    max_side: Annotated[int, typer.Option(
        help="Larger images are scaled down to this longer side for the network, as in clipes label; 0 disables, "
             f"else at least {MIN_MAX_SIDE}.", callback=max_side_option)] = 1024,
    ignore_exif: Annotated[bool, typer.Option(
        "--ignore-exif", help="Use the stored pixel order instead of the EXIF orientation.")] = False,
    dataset: Annotated[str | None, typer.Option(
        help="voc or coco: images and labels of --split under --root (or IMAGES).")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset root for --dataset.")] = None,
    split: Annotated[str, typer.Option(help="Dataset split (voc: train, val, train_aug, ...; coco: train, val).")
                     ] = "train",
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="The ranking as JSON: [{template, sharpness, images}, ...], best first.")
    ] = Path("prompt_ranking.json"),
    write_class_set: Annotated[Path | None, typer.Option(
        help="Also write the class set with the winning template as YAML, for clipes label --classes.")] = None,
    gt: Annotated[Path | None, typer.Option(
        help="Ground truth (label PNGs or a COCO instances JSON) for some of the images: the top --validate "
             "templates are also scored by pseudo-mask mIoU.")] = None,
    validate: Annotated[int | None, typer.Option(
        help="How many of the best templates to label and score against the ground truth \\[default: 3 with "
             "--gt; with --dataset, only when given].", show_default=False, min=0)] = None,
    show: Annotated[int, typer.Option(help="Rows of the printed table (the class set's template is always "
                                           "shown); 0 shows all.", min=0)] = 20,
    cam: CamOption = "gradcam",
    getam_start: GetamStartOption = None,
) -> None:
    """Rank prompt templates by CLIP-ES's sharpness on your multi-label images (lower is better)."""
    console = make_console()
    with reported_errors(console):
        ranked = _rank(console, images=images, labels=labels, classes=classes, templates=templates,
                       imagenet=imagenet, model=model, device=device, batch_size=batch_size, workers=workers,
                       max_side=max_side or None, exif=not ignore_exif and not dataset, dataset=dataset, root=root,
                       split=split, out=out, write_class_set=write_class_set, gt=gt, validate=validate, show=show,
                       cam=cam, getam_start=getam_start)
    console.print(f"best: {escape(repr(ranked[0].template))} (sharpness {ranked[0].sharpness:.6g}) -> "
                  f"{escape(str(out))}" + (f", {escape(str(write_class_set))}" if write_class_set else ""),
                  highlight=False)


def _rank(console: Console, *, images, labels, classes, templates, imagenet, model, device, batch_size, workers,
          max_side, exif, dataset, root, split, out, write_class_set, gt, validate, show, cam,
          getam_start) -> list[TemplateScore]:
    from ..cams import DenseCam, make_cam
    from ..evaluate import open_ground_truth
    from ..label_plan import lookup_labels
    from ..model import load_clip, resolve_device
    from ..output import check_not_inputs, named_file
    from ..pipeline import decode_workers
    from ..prompt_selection import (
        candidate_templates,
        class_set_yaml,
        embed_images,
        label_matrix,
        rank,
        read_templates,
        score_templates,
        validate_templates,
        with_template,
    )

    inp = _inputs(images, root, dataset, split, classes, labels, gt)
    candidates = candidate_templates(inp.class_set, read_templates(templates) if templates else (), imagenet)
    check_not_inputs({"--out": out, "--write-class-set": write_class_set},
                     {"the input folder": inp.root, "--labels": labels, "--classes": named_file(classes),
                      "--templates": templates, "--gt": inp.gt, "--model": named_file(model)})
    _check_output(out, "--out", (".json",))
    if write_class_set is not None:
        _check_output(write_class_set, "--write-class-set", (".yaml", ".yml"))
    n_validate = validate if validate is not None else (3 if gt is not None else 0)
    if validate is not None and inp.gt is None:
        raise ClipesError("--validate needs ground truth: --gt MASKS (label PNGs or a COCO instances JSON)")
    truth = open_ground_truth(inp.gt, inp.class_set) if n_validate else None
    cam_method = make_cam(cam, start=getam_start)  # the CAM of the validation's pseudo masks
    if isinstance(cam_method, DenseCam):
        raise ClipesError(f"--cam {cam}: a dense method queries its own words with CLIP's 80 templates; ranking "
                          "templates needs gradcam or getam")

    labelled = [(stem, path, lab) for stem, path in inp.items if (lab := lookup_labels(inp.labels, stem)) is not None]
    multi = [item for item in labelled if len(item[2]) >= 2]
    source = f"--labels {labels}" if labels else f"--dataset {dataset} --split {split}"
    if not multi:
        raise ClipesError(f"sharpness needs images with two or more labels, and none of the {len(labelled)} "
                          f"labelled image(s) in {inp.root} has two or more ({source})")
    dev = resolve_device(device)
    clip = load_clip(model, device=dev)
    cam_method.first_block(len(clip.visual.transformer.resblocks))
    size = int(batch_size) if batch_size != "auto" else (32 if dev.type == "cuda" else 4)
    loader_args = {"max_side": max_side, "batch_size": size, "workers": decode_workers(workers, dev),
                   "exif_transpose": exif}

    with _progress(console) as progress:
        task = progress.add_task("embedding images", total=len(multi))
        began = time.perf_counter()
        emb = embed_images(clip, multi, advance=lambda n: progress.advance(task, n), **loader_args)
        embed_s = time.perf_counter() - began
        for why in emb.failed:
            console.print(f"[yellow]skipped[/] {escape(why)}", highlight=False)
        if not emb.stems:
            raise ClipesError("none of the images with two or more labels could be read")
        task = progress.add_task("scoring templates", total=len(candidates))
        began = time.perf_counter()
        scored = score_templates(clip, inp.class_set, emb.embeddings, label_matrix(emb.labels, len(inp.class_set)),
                                 candidates, advance=lambda: progress.advance(task))
        score_s = time.perf_counter() - began
        ranked = rank(scored)
        if truth is not None:
            checked = []  # ground truth found by the image's relative stem or its bare file stem
            for stem, path, lab in labelled:
                key = stem if stem in truth else stem.rsplit("/", 1)[-1]
                if key in truth:
                    checked.append((key, path, lab))
            if not checked:
                raise ClipesError(f"none of the labelled images in {inp.root} has ground truth in {inp.gt}")
            top = ranked[:n_validate]
            task = progress.add_task("validating", total=len(top) * len(checked))
            found = validate_templates(clip, inp.class_set, [r.template for r in top], checked, truth, cam=cam_method,
                                       advance=lambda n: progress.advance(task, n), **loader_args)
            for r, (miou, count) in zip(top, found, strict=True):
                r.miou, r.miou_images = miou, count

    console.print(_table(ranked, inp.class_set.templates, show, truth is not None))
    if truth is not None:
        console.print(f"mIoU: pseudo masks of the best {min(n_validate, len(ranked))} template(s) on "
                      f"{ranked[0].miou_images} image(s) with ground truth in {escape(str(inp.gt))}", highlight=False)
    console.print(f"{len(emb.stems)} image(s) with two or more labels embedded in {embed_s:.2f}s; "
                  f"{len(candidates)} templates scored in {score_s:.2f}s "
                  f"({1000 * score_s / len(candidates):.1f} ms a template) on {dev}", highlight=False)
    if len(inp.items) > len(labelled):
        console.print(f"{len(inp.items) - len(labelled)} image(s) have no entry in the labels and are not used",
                      highlight=False)
    if len(labelled) > len(multi):
        console.print(f"{len(labelled) - len(multi)} labelled image(s) with fewer than two labels do not count "
                      "towards sharpness", highlight=False)
    write_output(out, (json.dumps([r.to_dict() for r in ranked], indent=1) + "\n").encode(), "--out")
    if write_class_set is not None:
        best = ranked[0]
        header = (f"written by clipes prompts rank: {best.template!r}, sharpness {best.sharpness:.6g} on "
                  f"{best.images} image(s), best of {len(ranked)} templates\n"
                  f"use it with: clipes label IMAGES --classes {write_class_set.name}")
        write_output(write_class_set, class_set_yaml(with_template(inp.class_set, best.template), header).encode(),
                     "--write-class-set")
    return ranked


@app.command("show")
def show_command(
    classes: Annotated[str, typer.Option(help="Class set: voc, coco, or a YAML / text file.")] = "voc",
    templates: Annotated[Path | None, typer.Option(
        help="Show the prompts with these templates (one per line) instead of the class set's.")] = None,
) -> None:
    """Print the exact prompt strings the text encoder sees, one per line: 'class<TAB>prompt'."""
    from ..prompts import load_class_set
    from ..templates import prompt_strings, read_templates  # no torch: the prompts are text

    console = make_console()
    with reported_errors(console):
        class_set = load_class_set(classes)
        if templates is not None:
            class_set = replace(class_set, templates=tuple(read_templates(templates)))
    per = len(class_set.templates)
    typer.echo(f"# class set {class_set.name}: {len(class_set)} classes, {len(class_set.background)} background "
               f"prompts, {per} template(s)" + (" (a class's embedding is the mean of its lines')" if per > 1 else ""))
    for names, texts in ((class_set.classes, class_set.prompts),
                         (("background",) * len(class_set.background), class_set.background)):
        for i, prompt in enumerate(prompt_strings(texts, class_set.templates)):
            typer.echo(f"{names[i // per]}\t{prompt}")
