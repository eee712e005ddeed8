"""``clipes``: CLIP-ES pseudo labels from the command line."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..defaults import CAA_BLOCKS, DTYPE_ENV, MODEL_ENV, block_slice
from ..errors import ClipesError
from .common import (
    MIN_MAX_SIDE,
    CamOption,
    DenseLogitScaleOption,
    DenseProbOption,
    DenseScaleOption,
    DenseStrideOption,
    DenseWindowOption,
    GetamStartOption,
    OneLineErrorGroup,
    PamrIterationsOption,
    batch_size_option,
    finite,
    make_console,
    max_side_option,
    reported_errors,
)
from .evaluate import eval_command
from .export import export_command
from .prompts import app as prompts_app
from .tag import tag_command
from .train import segment_command, train_seg_command
from .view import view_command

app = typer.Typer(help="CLIP-ES pseudo segmentation labels from image-level labels (or none).", cls=OneLineErrorGroup,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"clipes {version('clipes')}")
        raise typer.Exit()


# The callbacks import what they check only for a value that needs it: `--help` and usage errors come back
# before torch loads (about 4 s on a quiet machine, much more under load).

def _refine(value: str | None) -> str | None:
    if value is None:
        return value
    from ..method_options import REFINER_FLAGS  # the names, without torch

    if value not in (*REFINER_FLAGS, "none"):
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(REFINER_FLAGS)} or none")
    return value


def _crf_backend(value: str | None) -> str | None:
    if value is None:
        return value
    from ..method_options import CRF_BACKENDS

    if value not in CRF_BACKENDS:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(CRF_BACKENDS)}")
    return value


def _device(value: str) -> str:
    if value in ("auto", "cpu"):
        return value  # always valid
    if not re.fullmatch(r"cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r}: choose auto, cpu, cuda or cuda:N")  # resolve_device's words
    from ..model import resolve_device

    try:
        resolve_device(value)
    except ClipesError as e:
        raise typer.BadParameter(str(e).removeprefix("--device ")) from None
    return value


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """CLIP-ES pseudo segmentation labels from image-level labels (or none)."""


def _caa_blocks(value: str) -> str:
    try:
        block_slice(value)
    except ClipesError as e:
        raise typer.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


@app.command()
def label(
    images: Annotated[Path | None, typer.Argument(
        help="Folder of images (searched recursively; never written to), or the dataset root with "
             "--dataset.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("clipes_out"),
    classes: Annotated[str, typer.Option(help="Class set: voc, coco, or a YAML / text file.")] = "voc",
    labels: Annotated[Path | None, typer.Option(
        help="Image-level labels: JSON map, 'stem class ...' text, VOC Annotations/ folder or COCO "
             "instances JSON. Without it, labels are inferred by --tagger (TagCLIP by default).")] = None,
    model: Annotated[str | None, typer.Option(
        envvar=MODEL_ENV, help="open_clip ARCH/TAG, hf-hub:ID, a checkpoint path, ARCH:PATH, or a "
                               "transformers CLIP folder or hub ID (org/name) \\[default: ViT-B-16/openai].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=_device)] = "auto",
    dtype: Annotated[str | None, typer.Option(
        envvar=DTYPE_ENV, show_default=False,
        help="auto (default: bf16 on a GPU; on the CPU bf16 where it measures faster than float32, else "
             "float32), float32 (exact, as the parity tests pin it), bfloat16 or float16 (the vision weights "
             "cast once).")
    ] = None,
    bg_power: Annotated[float, typer.Option(help="t in the background score (1 - max cam)^t; > 0.",
                                            callback=finite(0, low_open=True))] = 1.0,
    box_threshold: Annotated[float | None, typer.Option(
        help="CAA box threshold, in \\[0, 1] \\[default: the class set's, 0.4 VOC, 0.7 COCO].",
        callback=finite(0, 1))] = None,
    tagger: Annotated[str, typer.Option(
        help="Without --labels: how labels are inferred, tagclip (TagCLIP) or global (CLIP's CLS embedding).")
    ] = "tagclip",
    zero_shot_threshold: Annotated[float, typer.Option(
        help="With --tagger global: softmax score (in \\[0, 1]) a class needs to count as present.",
        callback=finite(0, 1))] = 0.1,
    cam: CamOption = "gradcam",
    getam_start: GetamStartOption = None,
    dense_scale: DenseScaleOption = None,
    dense_window: DenseWindowOption = None,
    dense_stride: DenseStrideOption = None,
    dense_logit_scale: DenseLogitScaleOption = None,
    dense_prob: DenseProbOption = None,
    max_side: Annotated[int, typer.Option(
        help="Larger images are scaled down to this longer side for the network (masks keep the "
             f"original size); 0 disables, else at least {MIN_MAX_SIDE}.", callback=max_side_option)] = 1024,
    ignore_exif: Annotated[bool, typer.Option(
        "--ignore-exif", help="Use the stored pixel order instead of the EXIF orientation (always so with --dataset, "
                              "whose annotations are of the pixels as stored).")] = False,
    save_cams: Annotated[bool, typer.Option("--save-cams", help="Also write cams/<stem>.npz.")] = False,
    overlays: Annotated[bool, typer.Option("--overlays", help="Also write overlays/<stem>.jpg.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images already labelled.")] = False,
    batch_size: Annotated[str, typer.Option(
        help="Images per batch (same input size), or 'auto': 32 on a GPU, 4 on the CPU, halved on "
             "out-of-memory.", callback=batch_size_option)] = "auto",
    workers: Annotated[int | None, typer.Option(
        help="DataLoader processes decoding and resizing images \\[default: up to 8 per GPU, 1 on the CPU].",
        show_default=False, callback=finite(0))] = None,
    crf: Annotated[bool, typer.Option("--crf", help="Refine masks with the reference's dense CRF "
                                                   "(pip install 'clipes\\[crf]'); the same as --refine crf.")] = False,
    refine: Annotated[str | None, typer.Option(
        help="Pixel refiner of the masks: crf (the reference's dense CRF; see --crf-backend), par (AFA's PAR, on "
             "--device; 255 between its two background thresholds), pamr (PAMR, NACLIP's; on a dense --cam's "
             "logits) or none \\[default: none; pamr for --cam naclip].",
        show_default=False, callback=_refine)] = None,
    par_bg_high: Annotated[float | None, typer.Option(
        help="With --refine par: the background score of the run that decides foreground, in \\[0, 1] "
             "\\[default: 0.55, AFA's].", show_default=False, callback=finite(0, 1))] = None,
    par_bg_low: Annotated[float | None, typer.Option(
        help="With --refine par: the background score of the run that must agree on background (else 255), "
             "in \\[0, 1], at most --par-bg-high \\[default: 0.35, AFA's].", show_default=False,
        callback=finite(0, 1))] = None,
    par_iterations: Annotated[int | None, typer.Option(
        help="With --refine par: propagation steps \\[default: AFA's, 15 for --classes coco, 10 otherwise].",
        show_default=False, callback=finite(0))] = None,
    pamr_iterations: PamrIterationsOption = None,
    caa_blocks: Annotated[str, typer.Option(
        help="The ViT blocks whose attention CAA averages, a Python slice START:STOP: -8: the last eight (CLIP-ES), "
             "-8:-1 the seven before the last (TagCLIP's label-free VOC run).", callback=_caa_blocks)
    ] = CAA_BLOCKS,
    crf_workers: Annotated[int, typer.Option(
        help="Processes running the CRF \\[0: the cores the DataLoader and main process leave, if two or more; "
             "else in-process].", callback=finite(0))] = 0,
    crf_backend: Annotated[str | None, typer.Option(
        help="With --crf: torch (on --device, batched; no compiler or extra package) or pydensecrf (host CPU) "
             "\\[default: torch on a GPU, pydensecrf on the CPU when installed].", show_default=False,
        callback=_crf_backend)] = None,
    dataset: Annotated[str | None, typer.Option(
        help="voc or coco: IMAGES is the dataset root; images and labels come from --split.")] = None,
    split: Annotated[str, typer.Option(help="Dataset split (voc: train, val, train_aug, ...; coco: train, val).")
                     ] = "train",
    split_file: Annotated[Path | None, typer.Option(
        help="The images to take, one name per line (default: every image of the folder; with --dataset the "
             "split's list for VOC, for COCO every image with at least one label).")] = None,
    confidence: Annotated[float | None, typer.Option(
        help="With --crf: pixels whose CRF probability is below this (CLIP-ES: 0.95) become 255, "
             "ignored by train-seg; in (0, 1].", callback=finite(0, 1, low_open=True))] = None,
) -> None:
    """Write CLIP-ES pseudo masks (VOC palette PNGs) for a folder of images."""
    from ..label_plan import LabelConfig, plan_label  # no torch: mistakes and nothing-to-do are answered at once

    console = make_console()
    if crf and refine not in (None, "crf"):
        with reported_errors(console):
            raise ClipesError(f"--crf is --refine crf; it cannot go with --refine {refine}")
    cfg = LabelConfig(images=images, out=out, classes=classes, labels=labels, model=model, device=device,
                      dtype=dtype, bg_power=bg_power, box_threshold=box_threshold,
                      zero_shot_threshold=zero_shot_threshold, max_side=max_side or None,
                      exif_transpose=False if ignore_exif else None, save_cams=save_cams, overlays=overlays,
                      overwrite=overwrite, batch_size=None if batch_size == "auto" else int(batch_size),
                      workers=workers, refine="crf" if crf else refine, confidence=confidence,
                      par_bg_high=par_bg_high, par_bg_low=par_bg_low, par_iterations=par_iterations,
                      caa_blocks=caa_blocks, crf_workers=crf_workers, crf_backend=crf_backend,
                      dataset=dataset,
                      split=split, split_file=split_file, tagger=tagger, cam=cam, getam_start=getam_start,
                      dense_scale=dense_scale, dense_window=dense_window, dense_stride=dense_stride,
                      dense_logit_scale=dense_logit_scale, dense_prob=dense_prob, pamr_iterations=pamr_iterations)
    with reported_errors(console):
        plan = plan_label(cfg, console)
        if plan.finished is not None:
            summary = plan.finished
        else:
            from ..run import label_folder  # torch, the model's modules

            summary = label_folder(cfg, console, plan)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports for the whole job
    console.print(f"labelled {summary.labelled} image(s) in {summary.seconds:.1f}s "
                  f"({summary.images_per_second:.2f} img/s), {summary.skipped} already done, "
                  f"{len(summary.failed)} unreadable -> {escape(str(out))}", highlight=False)
    if summary.unlabelled:
        console.print(f"[yellow]{len(summary.unlabelled)} image(s) have no entry in {escape(str(labels))}[/]: "
                      + escape(", ".join(summary.unlabelled[:5])) + (" ..." if len(summary.unlabelled) > 5 else ""))
    for _path, why in summary.failed:
        console.print(f"[yellow]unreadable[/] {escape(why)}", highlight=False)
    if summary.labelled == 0 and summary.skipped == 0 and summary.unlabelled:
        with reported_errors(console):
            raise ClipesError(f"no image in {images} has an entry in {labels or f'{dataset}/{split}'} "
                              f"(e.g. {summary.unlabelled[0]!r} has none): nothing was labelled")


app.command("eval")(eval_command)
app.command("view")(view_command)
app.command("export")(export_command)
app.command("train-seg")(train_seg_command)
app.command("segment")(segment_command)
app.command("tag")(tag_command)
app.add_typer(prompts_app, name="prompts")


# --help into a pipe or file: wider than rich's 80 columns, so that no default is cut short ("prompt_ranking.js…")
PLAIN_HELP_WIDTH = 120


def main() -> None:
    if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH") and not os.environ.get("COLUMNS"):
        import typer.rich_utils

        typer.rich_utils.MAX_WIDTH = PLAIN_HELP_WIDTH  # read by Typer when it renders help
    try:
        app()
    except Exception as e:  # an installation that cannot import torchvision: one line naming the fix
        from ..install_check import torch_pair_mismatch

        message = torch_pair_mismatch(e)
        if message is None:
            raise
        make_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
