"""``clipes label`` as a function: a folder of images in, pseudo masks out, resumable."""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader

from .caa import CAA_BLOCKS, block_slice, caa_blocks
from .cams import CamMethod, make_cam
from .data import ImageFolderDataset, collate_samples, probe_input_size, size_batches
from .datasets import listed_images, load_split
from .distributed import DistInfo, first_failure, gather_to_rank0, process_group
from .errors import ClipesError
from .images import find_images
from .labeler import Labeler, LabelResult
from .labels import read_labels
from .model import ClipModel, load_clip, resolve_device
from .output import OutputError, RunOutput, check_not_inputs, check_writable, named_file
from .pipeline import Item, RunSummary, batch_sizer, crf_pool, decode_workers, progress_bar, run_batches
from .precision import DTYPE_ENV, DTYPES, DtypeChoice, resolve_dtype, slow_low_precision
from .prompts import builtin_class_sets, load_class_set
from .provenance import input_stamp, model_identity
from .refiners import Refiner, make_refiner
from .refiners.crf_torch import with_crf_backend
from .refiners.par import par_iterations
from .tagging import tagger_class, tagger_settings

__all__ = ["LabelConfig", "RunSummary", "label_folder"]

@dataclass
class LabelConfig:
    """Options of a labelling run (the CLI flags of ``clipes label``).

    ``batch_size`` None is automatic: 32 on a GPU, 4 on the CPU, halved on out-of-memory.
    ``workers`` None is automatic: up to 8 DataLoader processes per GPU, 1 on the CPU (see
    ``decode_workers``). ``refine`` names the pixel refiner (``clipes.refiners``: crf, par; None:
    none); ``confidence`` is the CRF's option, ``par_bg_high`` / ``par_bg_low`` / ``par_iterations``
    PAR's (None: the refiner's default; PAR's iterations: 15 for COCO, 10 otherwise). ``crf_workers``
    0 is automatic: a process pool on the CPU cores that the DataLoader and the main process leave,
    when at least two are left, for a refiner that runs on the host (the CRF); else it runs in the
    main process. ``crf_backend`` runs the CRF with torch
    (on ``device``, batched) or pydensecrf (host CPU); None: torch on a GPU, pydensecrf on the CPU.
    ``cam`` names the CAM method (``clipes.cams``: gradcam, getam); ``getam_start`` is GETAM's first
    block (None: its default, 6).
    """

    images: Path | None
    out: Path
    classes: str = "voc"
    labels: Path | None = None
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    bg_power: float = 1.0
    box_threshold: float | None = None
    zero_shot_threshold: float = 0.1
    max_side: int | None = 1024
    exif_transpose: bool | None = None
    save_cams: bool = False
    overlays: bool = False
    overwrite: bool = False
    batch_size: int | None = None
    workers: int | None = None
    refine: str | None = None
    confidence: float | None = None
    par_bg_high: float | None = None
    par_bg_low: float | None = None
    par_iterations: int | None = None
    caa_blocks: str = CAA_BLOCKS
    crf_workers: int = 0
    crf_backend: str | None = None
    dataset: str | None = None
    split: str = "train"
    split_file: Path | None = None
    per_pair_backward: bool = False
    tagger: str = "tagclip"
    cam: str = "gradcam"
    getam_start: int | None = None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("clipes", "torch", "open_clip_torch", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _lookup(labels: dict[str, list[int]], stem: str) -> list[int] | None:
    """Labels of an image keyed by its relative stem or its bare file stem."""
    if stem in labels:
        return labels[stem]
    return labels.get(stem.rsplit("/", 1)[-1])


def _cam(cfg: LabelConfig) -> CamMethod:
    """The CAM method ``cfg`` asks for; an option of another method is refused by its flag."""
    return make_cam(cfg.cam, per_pair=cfg.per_pair_backward, start=cfg.getam_start)


def _refiner(cfg: LabelConfig, class_set) -> Refiner | None:
    """The pixel refiner ``cfg`` asks for; an option of another refiner is refused by its flag. PAR's
    iterations follow the class set (AFA: 15 for COCO, 10 for VOC) unless ``par_iterations`` is given."""
    iterations = cfg.par_iterations
    if iterations is None and cfg.refine == "par":
        iterations = par_iterations(class_set.name)
    refiner = make_refiner(cfg.refine, confidence=cfg.confidence, bg_high=cfg.par_bg_high, bg_low=cfg.par_bg_low,
                           iterations=iterations)
    return with_crf_backend(refiner, cfg.crf_backend, resolve_device(cfg.device))


def _label_todo(cfg: LabelConfig, console: Console, clip: ClipModel, todo: list[Item], class_set, dtype_name: str,
                device: torch.device, dist_info: DistInfo, out: RunOutput, manifest: dict,
                summary: RunSummary) -> None:
    """Run the batched engine over ``todo``, a host refiner (the CRF) in a process pool if it pays."""
    refiner = _refiner(cfg, class_set)
    batch_size = cfg.batch_size or (32 if device.type == "cuda" else 4)
    decoders = decode_workers(cfg.workers, device, dist_info.world)
    sizes = [probe_input_size(it.path, clip.patch_size, cfg.max_side, cfg.exif_transpose) for it in todo]
    dataset = ImageFolderDataset([(it.stem, it.path, it.labels) for it in todo], clip.patch_size, cfg.max_side,
                                 cfg.exif_transpose, keep_image=cfg.overlays or refiner is not None)
    loader = DataLoader(dataset, batch_sampler=size_batches(sizes, batch_size), collate_fn=collate_samples,
                        num_workers=decoders, pin_memory=device.type == "cuda")
    with crf_pool(refiner, cfg.crf_workers, decoders) as pool, progress_bar(console, dist_info.is_main) as progress:
        labeler = Labeler(clip, class_set, bg_power=cfg.bg_power, box_threshold=cfg.box_threshold,
                          attn_blocks=caa_blocks(cfg.caa_blocks, len(clip.visual.transformer.resblocks)),
                          zero_shot_threshold=cfg.zero_shot_threshold, max_side=cfg.max_side, tagger=cfg.tagger,
                          cam=_cam(cfg), refiner=refiner if pool is None else None)

        def crf(rgb, result: LabelResult) -> Future:
            return pool.submit(refiner.refine_image, rgb, result.cam_refined, result.labels, cfg.bg_power)

        run_batches(loader, {it.stem: it for it in todo}, batch_sizer(labeler, batch_size), out, class_set.classes,
                     summary, progress, lambda: out.flush(manifest), None if pool is None else crf)


def label_folder(cfg: LabelConfig, console: Console | None = None) -> RunSummary:
    """Label every image of ``cfg.images`` into ``cfg.out``; images already done are skipped.

    Under ``torchrun`` each rank takes every world-th image and rank 0 merges the records, so the
    output folder is the same as one process would write.
    """
    console = console or Console(stderr=True)
    if cfg.images is None:
        raise ClipesError("give a folder of images, or --dataset voc|coco with its root folder")
    if cfg.dataset:
        if cfg.classes not in ("voc", cfg.dataset):
            raise ClipesError(f"--dataset {cfg.dataset} comes with its own class set; drop --classes {cfg.classes}")
        split = load_split(cfg.dataset, cfg.images, cfg.split, cfg.split_file)
        items, class_set, repeated = split.items, split.class_set, split.repeated
        if split.left_out:
            console.print(f"{split.left_out} image(s) of {split.name} have no label and are left out, as in the "
                          "authors' lists (--split-file names the images to take)", highlight=False)
        given = read_labels(cfg.labels, class_set) if cfg.labels else split.labels
    else:
        items, repeated = find_images(cfg.images), 0
        if cfg.split_file is not None:
            items, repeated = listed_images(items, cfg.split_file, str(cfg.images))
        class_set = load_class_set(cfg.classes)
        given = read_labels(cfg.labels, class_set) if cfg.labels else None
    if cfg.exif_transpose is None:  # a dataset's annotations are of the pixels as stored (as the authors read them)
        cfg = replace(cfg, exif_transpose=not cfg.dataset)
    block_slice(cfg.caa_blocks)
    if repeated:
        console.print(f"note: --split-file {escape(str(cfg.split_file))} names {repeated} image(s) again; each is "
                      "labelled once", highlight=False)
    check_not_inputs({"--out": cfg.out}, _input_files(cfg))
    check_writable(cfg.out)
    refiner = _refiner(cfg, class_set)
    if refiner is not None:
        refiner.check()
    tagger_class(cfg.tagger)  # checked with given labels too, before anything is written
    _cam(cfg)
    device = resolve_device(cfg.device)
    try:
        choice = _dtype_choice(cfg, device)
    except ValueError as e:
        raise ClipesError(str(e)) from None
    console.print(f"dtype: {choice.name} ({choice.reason})", highlight=False)
    slow = slow_low_precision(choice, device)
    if slow:
        console.print(f"[yellow]warning:[/] {escape(slow)}")
    with process_group(device) as (device, dist_info):
        return _label_folder(cfg, console, items, class_set, given, choice.name, device, dist_info)


def _dtype_choice(cfg: LabelConfig, device: torch.device) -> DtypeChoice:
    """``--dtype``; ``auto`` on a folder a run already labelled takes that run's dtype (its recorded
    settings), so that a resume never depends on a fresh speed measurement."""
    name = cfg.dtype or os.environ.get(DTYPE_ENV) or "auto"
    if name != "auto" or cfg.overwrite:
        return resolve_dtype(name, device)
    try:
        previous = json.loads((cfg.out / RunOutput.MANIFEST).read_text(encoding="utf-8"))["settings"]["dtype"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous in DTYPES:
        return DtypeChoice(previous, f"auto: the dtype {cfg.out} was labelled in")
    return resolve_dtype(name, device)


def _input_files(cfg: LabelConfig) -> dict[str, Path | None]:
    """The files and folders a run reads, by flag: never written, by this run or by an export of it."""
    return {"the input folder": cfg.images, "--labels": cfg.labels, "--classes": named_file(cfg.classes),
            "--model": named_file(cfg.model), "--split-file": cfg.split_file}


def _input_name(path: Path, root: Path) -> str:
    """``path`` relative to the input folder as given (a symlink stays a file of the folder)."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return str(path)


def _settings(cfg: LabelConfig, class_set, given, dtype_name: str) -> dict:
    """What shapes the masks, by meaning: a model by its content, a class set by its content.

    Given labels are not here: each image's record holds its own, so an edited labels file redoes
    just the images whose labels changed.
    """
    classes = class_set.to_dict()
    if class_set.name not in builtin_class_sets():
        classes["name"] = None  # a user file's name is its file name: a copy elsewhere is the same set
    # a tagger's settings hold its threshold when it has one (--zero-shot-threshold is the global tagger's)
    return {"model": model_identity(cfg.model), "classes": classes, "dtype": dtype_name, "bg_power": cfg.bg_power,
            "tagger": tagger_settings(cfg.tagger, class_set, cfg.zero_shot_threshold) if given is None else None,
            "box_threshold": cfg.box_threshold if cfg.box_threshold is not None else class_set.box_threshold,
            "max_side": cfg.max_side, "exif_transpose": cfg.exif_transpose,
            "refiner": None if (refiner := _refiner(cfg, class_set)) is None else refiner.settings(),
            # only another choice than CLIP-ES's is recorded: folders of earlier runs stay resumable
            **({"caa_blocks": cfg.caa_blocks} if cfg.caa_blocks != CAA_BLOCKS else {}),
            # GradCAM made every folder before CAM methods could be chosen: it is the absence of the key,
            # so that those folders resume; the manifest's options name the method either way
            **({} if (cam := _cam(cfg)).name == "gradcam" else {"cam": cam.settings()})}


def _label_folder(cfg: LabelConfig, console: Console, items, class_set, given, dtype_name: str,
                  device: torch.device, dist_info: DistInfo) -> RunSummary:
    out = RunOutput(cfg.out, _settings(cfg, class_set, given, dtype_name), save_cams=cfg.save_cams,
                    overlays=cfg.overlays, overwrite=cfg.overwrite, rank=dist_info.rank, world=dist_info.world)
    summary = RunSummary()
    todo: list[Item] = []
    for stem, path in items:
        labels = None if given is None else _lookup(given, stem)
        if given is not None and labels is None:
            summary.unlabelled.append(stem)
            continue
        try:
            stamp = input_stamp(path, _input_name(path, cfg.images))
        except OSError as e:
            summary.failed.append((str(path), f"{path}: cannot read image ({e.strerror or e})"))
            continue
        names = None if labels is None else [class_set.classes[i] for i in labels]
        if out.is_done(stem, stamp, names):
            summary.skipped += 1
        else:
            todo.append(Item(stem, path, stamp, labels, names))
    work, to_label = bool(todo), len(todo)  # the job's, not this rank's share: every rank takes the same path below
    todo = todo[dist_info.rank::dist_info.world]
    if not dist_info.is_main:
        summary.failed, summary.unlabelled = [], []  # rank 0 reports those for the job
    manifest = {"tool": "clipes label", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": str(cfg.images.resolve()), "options": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in asdict(cfg).items()},
                "versions": _versions(), "device": str(device), "world_size": dist_info.world,
                # what an export checks: the run's inputs (never written over) and whether the run finished
                "inputs": {flag: os.path.abspath(p) for flag, p in _input_files(cfg).items() if p is not None},
                "images": summary.skipped + to_label, "finished": False}
    if not work and not out.records and not cfg.overwrite:
        return summary  # nothing to write: the folder is left as it is (or never made)
    # the model is loaded before anything is written: a model that does not load leaves no trace.
    # Every rank loads it when the job has work (a rank whose share is empty too), then rank 0 takes
    # the folder (lock, --overwrite's clearing) before the others write; a failure on any rank stops
    # them all here instead of leaving them waiting for it at the next collective.
    clip, failure = None, None
    try:
        clip = load_clip(cfg.model, device=device, dtype=DTYPES[dtype_name]) if work else None
        if clip is not None:
            caa_blocks(cfg.caa_blocks, len(clip.visual.transformer.resblocks))  # selects some of its blocks
            _cam(cfg).first_block(len(clip.visual.transformer.resblocks))  # --getam-start within the model
        if dist_info.is_main:
            out.open()
    except Exception as e:
        failure = e
    failed = first_failure(None if failure is None else str(failure), dist_info)
    if failed is not None:
        out.close()
        if failure is not None:
            raise failure
        raise ClipesError(f"rank {failed[0]} stopped the run: {failed[1]}")
    if clip is not None:
        manifest["model"] = {"spec": clip.spec, "arch": clip.arch}
    start = time.perf_counter()
    ok = False
    try:
        if not dist_info.is_main:
            out.open()
        out.flush(manifest)
        if todo:
            _label_todo(cfg, console, clip, todo, class_set, dtype_name, device, dist_info, out, manifest, summary)
        ok = True
    finally:
        summary.seconds = time.perf_counter() - start
        out.close_journal()
        try:
            parts = gather_to_rank0(summary, dist_info)
            if parts is not None:
                total = RunSummary(seconds=max(p.seconds for p in parts), unlabelled=summary.unlabelled,
                                   skipped=summary.skipped)
                for part in parts:
                    total.labelled += part.labelled
                    total.failed += part.failed
                manifest["summary"] = {"labelled": total.labelled, "skipped": total.skipped,
                                       "failed": total.failed, "unlabelled": total.unlabelled}
                manifest["finished"] = ok
                out.finalize(manifest)
                summary = total
        except OutputError:
            if ok:
                raise  # else the error that stopped the run is the one to report
        finally:
            out.close()
    return summary
