"""``clipes train-seg`` and ``clipes segment``: the segmenter stage of CLIP-ES."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..defaults import DEFAULT_MODEL, MODEL_ENV
from ..errors import ClipesError
from ..segment.presets import preset_help  # the presets as data, no torch: help says what a run takes
from .common import make_console, positive_floats, reported_errors

# Help texts are rich markup: a literal "[...]" is written "\\[...]" or rich drops it as a style tag.
# Flags take metavar="" so that help shows "--resume", not "--resume <bool>".


def train_seg_command(
    config: Annotated[Path | None, typer.Option(help="YAML config (keys of TrainConfig); flags given here override "
                                                     "it.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder: checkpoints, log, config "
                                                                "\\[clipes_seg].")] = None,
    images: Annotated[str | None, typer.Option(help="Training images.")] = None,
    masks: Annotated[str | None, typer.Option(help="Pseudo masks (clipes label's masks/), 255 ignored.")] = None,
    val_images: Annotated[str | None, typer.Option(help="Validation images.")] = None,
    val_masks: Annotated[str | None, typer.Option(help="Validation ground truth.")] = None,
    confidence: Annotated[str | None, typer.Option(
        help="A clipes label run made with --crf --save-cams: weight pixels by its CRF confidence.")] = None,
    dataset: Annotated[str | None, typer.Option(help="voc or coco (images from --root/--split).")] = None,
    root: Annotated[str | None, typer.Option(help="Dataset root.")] = None,
    split: Annotated[str | None, typer.Option(help="Training split \\[train].")] = None,
    val_split: Annotated[str | None, typer.Option(help="Validation split \\[val], scored on its ground truth.")
                         ] = None,
    classes: Annotated[str | None, typer.Option(help="Class set: voc, coco or a file \\[voc].")] = None,
    model: Annotated[str | None, typer.Option(
        help="clip-linear, clip-segmenter, clip-setr-naive, clip-setr-pup, clip-setr-mla, deeplabv2-resnet101 "
             "(deeplab-pytorch's MSC model), deeplabv2-resnet101-torchvision, deeplabv3-resnet50, deeplabv3-resnet101 "
             "or tiny \\[clip-linear].")] = None,
    clip_model: Annotated[str | None, typer.Option(
        help=f"CLIP weights of the clip-* models, as clipes label --model: open_clip ARCH/TAG, hf-hub:ID, a checkpoint "
             f"path, ARCH:PATH, or a transformers CLIP folder or hub ID \\[default: ${MODEL_ENV}, else "
             f"{DEFAULT_MODEL}].")] = None,
    finetune: Annotated[bool | None, typer.Option(
        "--finetune/--freeze", metavar="",
        help=f"Train the backbone too, or freeze it \\[preset, frozen: {preset_help('freeze_backbone')}].")
    ] = None,
    backbone_weights: Annotated[str | None, typer.Option(
        help="deeplabv2-resnet101: a deeplab-pytorch state dict (convert.py's Caffe init) or 'random'; the "
             "torchvision DeepLabs: a torchvision ResNet state dict, 'imagenet' (torchvision's download or cache) or "
             "'random' \\[imagenet].")] = None,
    optimizer: Annotated[str | None, typer.Option(help=f"sgd or adamw \\[preset: {preset_help('optimizer')}].")
                         ] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate of the backbone \\[preset: {preset_help('lr')}]."
                                             )] = None,
    weight_decay: Annotated[float | None, typer.Option(
        help=f"Weight decay \\[preset: {preset_help('weight_decay')}].")] = None,
    steps: Annotated[int | None, typer.Option(help=f"Training steps \\[preset: {preset_help('steps')}].")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help=f"Global batch size \\[preset: {preset_help('batch_size')}].")] = None,
    accumulate: Annotated[int | None, typer.Option(
        help="Split each batch into this many parts whose gradients add up (same result, less memory) "
             f"\\[preset: {preset_help('accumulate')}].")] = None,
    crop: Annotated[int | None, typer.Option(help=f"Random crop size \\[preset: {preset_help('crop')}].")] = None,
    loss: Annotated[str | None, typer.Option(
        help="ce (the authors' cross-entropy) or balanced-ce (AdvCAM's class-balanced cross-entropy: the fix when "
             "DeepLab-v2 from the ImageNet init diverges to a NaN loss) \\[ce].")] = None,
    loss_norm: Annotated[str | None, typer.Option(
        help="Average the loss over the labelled pixels (labelled, CLIP-ES) or over every crop pixel (all, mmseg's "
             f"as SETR trains) \\[preset: {preset_help('loss_norm')}].")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--fp32", metavar="", help="bf16 autocast \\[fp32].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed \\[0].")] = None,
    val_every: Annotated[int | None, typer.Option(help="Validate and checkpoint every N steps \\[500].")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader processes \\[2].")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda \\[auto].")] = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue the run in OUT from its last.pt."
                                         )] = False,
    allow_changes: Annotated[bool, typer.Option(
        "--allow-changes", metavar="", help="With --resume: continue with settings that differ from the run's "
                                            "(else refused, naming each); log.jsonl records the change.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="",
                                            help="Replace the run in OUT (its checkpoints and log).")] = False,
    stop_at: Annotated[int | None, typer.Option(help="Stop after this step (resume later).")] = None,
) -> None:
    """Train a segmenter on pseudo masks with the confidence-guided loss."""
    from ..segment.train import load_config, train

    console = make_console()
    overrides = dict(out=out, images=images, masks=masks, val_images=val_images, val_masks=val_masks,
                     confidence=confidence, dataset=dataset, root=root, split=split, val_split=val_split,
                     classes=classes, model=model, clip_model=clip_model,
                     freeze_backbone=None if finetune is None else not finetune, backbone_weights=backbone_weights,
                     optimizer=optimizer, lr=lr, weight_decay=weight_decay, steps=steps, batch_size=batch_size,
                     accumulate=accumulate, crop=crop, loss=loss, loss_norm=loss_norm, bf16=bf16, seed=seed,
                     val_every=val_every, workers=workers,
                     device=device, resume=resume or None, allow_changes=allow_changes or None,
                     overwrite=overwrite or None, stop_at=stop_at)
    with reported_errors(console):
        result = train(load_config(config, overrides), console, config)
    if int(os.environ.get("RANK", "0")) == 0:
        best = result["best_miou"]
        console.print(f"step {result['step']}, loss {result['loss']:.4f}"
                      + (f", best val mIoU {100 * best:.2f}%" if best is not None else ", no validation set")
                      + f" -> {escape(result['checkpoint'])}", highlight=False)
        if best is not None:
            console.print(f"report {escape(result['checkpoint'])}: {escape(result['best_checkpoint'])} was selected "
                          "on the validation set, so its score there is optimistic", highlight=False)
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))


def _scales(value: str) -> str:
    positive_floats(value, "0.75,1,1.25")
    return value


def segment_command(
    images: Annotated[Path, typer.Argument(help="Folder of images.")],
    checkpoint: Annotated[Path, typer.Option(
        help="A train-seg checkpoint: last.pt (the one to report, as deeplab-pytorch does), or best.pt (selected "
             "on the validation set: optimistic there).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the predicted label PNGs.")],
    scales: Annotated[str, typer.Option(help="Comma-separated test scales, e.g. 0.75,1,1.25.",
                                        callback=_scales)] = "1",
    flip: Annotated[bool, typer.Option("--flip", metavar="", help="Also average horizontally flipped predictions."
                                       )] = False,
    crf: Annotated[bool, typer.Option(
        "--crf", metavar="", help="Refine with deeplab-pytorch's test-time dense CRF (10 iterations, Gaussian 1/3, "
                                  "bilateral 67/3/4), as DeepLab-v2 WSSS results are usually reported.")] = False,
    crf_backend: Annotated[str | None, typer.Option(
        help="torch or pydensecrf \\[torch on a GPU; pydensecrf on the CPU when installed].")] = None,
    split_file: Annotated[Path | None, typer.Option(
        help="Segment only the images this list names, one per line (e.g. VOC's ImageSets/Segmentation/val.txt) "
             "\\[every image of IMAGES].")] = None,
    ignore_exif: Annotated[bool, typer.Option(
        "--ignore-exif", metavar="", help="Use the stored pixel order instead of the EXIF orientation (as the "
                                          "datasets' annotations are; clipes label --dataset does so).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar="", help="Redo every image, and remove predictions of images no longer in IMAGES."
    )] = False,
) -> None:
    """Predict segmentation masks (VOC palette PNGs) with a trained segmenter."""
    from rich.progress import Progress

    from ..model import resolve_device
    from ..refiners.crf import require_pydensecrf
    from ..segment.crf import resolve_crf_backend
    from ..segment.infer import segment_folder

    console = make_console()
    with reported_errors(console):
        if crf_backend is not None and not crf:
            raise ClipesError("--crf-backend needs --crf")
        dev = resolve_device(device)
        backend = resolve_crf_backend(crf_backend, dev) if crf else None
        if backend == "pydensecrf":
            require_pydensecrf()
        with Progress(console=console) as progress:
            done, skipped, failed = segment_folder(checkpoint, images, out, dev, tuple(positive_floats(scales)), flip,
                                                   overwrite, progress, crf=backend, exif=not ignore_exif,
                                                   split_file=split_file)
    console.print(f"segmented {done} image(s), {skipped} already done -> {escape(str(out))}", highlight=False)
    for why in failed:
        console.print(f"[yellow]unreadable[/] {escape(why)}", highlight=False)
