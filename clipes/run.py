"""``clipes label`` as a function: a folder of images in, pseudo masks out, resumable."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import torch
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader

from .caa import caa_blocks
from .cams import CamMethod, DenseCam, cam_class, make_cam
from .data import ImageFolderDataset, collate_samples, probe_input_size, size_batches
from .distributed import DistInfo, first_failure, gather_to_rank0, process_group
from .errors import ClipesError
from .label_plan import (  # re-exported: the run as a function takes the options checked there
    Item,
    LabelConfig,
    LabelPlan,
    RunSummary,
    base_settings,
    input_files,
    options_record,
    plan_label,
    sort_items,
)
from .labeler import Labeler, LabelResult
from .method_options import run_refiner, run_tagger
from .model import ClipModel, load_clip, resolve_device
from .output import OutputError, RunOutput
from .pipeline import batch_sizer, crf_pool, decode_workers, progress_bar, run_batches
from .precision import DtypeChoice, resolve_dtype, slow_low_precision
from .refiners import Refiner, make_refiner
from .refiners.crf_torch import with_crf_backend
from .refiners.par import par_iterations
from .tagging import tagger_class, tagger_settings

__all__ = ["LabelConfig", "RunSummary", "label_folder"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("clipes", "torch", "open_clip_torch", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


@contextmanager
def _stage(console: Console, what: str, enabled: bool = True) -> Iterator[None]:
    """A spinner naming the stage (model load, text encoding) while nothing else moves; rank 0's only."""
    if not enabled:
        yield
        return
    with console.status(f"{what} ...", spinner="dots"):
        yield


def _cam(cfg: LabelConfig) -> CamMethod:
    """The CAM method ``cfg`` asks for; an option of another method is refused by its flag."""
    dense = issubclass(cam_class(cfg.cam), DenseCam)
    return make_cam(cfg.cam, per_pair=cfg.per_pair_backward, start=cfg.getam_start, scale=cfg.dense_scale,
                    window=cfg.dense_window, stride=cfg.dense_stride, logit_scale=cfg.dense_logit_scale,
                    prob_threshold=cfg.dense_prob, pamr_steps=0 if dense and cfg.refine == "none" else None)


def _refiner(cfg: LabelConfig, class_set) -> Refiner | None:
    """The pixel refiner ``cfg`` asks for (its flags were checked before torch, ``check_method_options``).
    PAR's iterations follow the class set (AFA: 15 for COCO, 10 for VOC) unless ``par_iterations`` is
    given; NACLIP's PAMR is its default (``--refine none`` turns it off), with its authors' steps."""
    name, iterations = run_refiner(cfg.refine, cfg.cam), cfg.par_iterations
    if name == "pamr":
        cam = _cam(cfg)
        iterations = cfg.pamr_iterations
        if iterations is None and isinstance(cam, DenseCam) and cam.protocol.pamr_steps:
            iterations = cam.protocol.pamr_steps
    elif iterations is None and name == "par":
        iterations = par_iterations(class_set.name)
    refiner = make_refiner(name, confidence=cfg.confidence, bg_high=cfg.par_bg_high, bg_low=cfg.par_bg_low,
                           iterations=iterations)
    return with_crf_backend(refiner, cfg.crf_backend, resolve_device(cfg.device))


def _label_todo(cfg: LabelConfig, console: Console, clip: ClipModel, todo: list[Item], class_set,
                device: torch.device, dist_info: DistInfo, out: RunOutput, manifest: dict,
                summary: RunSummary) -> None:
    """Run the batched engine over ``todo``, a host refiner (the CRF) in a process pool if it pays."""
    refiner = _refiner(cfg, class_set)
    batch_size = cfg.batch_size or (32 if device.type == "cuda" else 4)
    decoders = decode_workers(cfg.workers, device, dist_info.world)
    sizes = [probe_input_size(it.path, clip.patch_size, cfg.max_side, cfg.exif_transpose) for it in todo]
    keep_image = cfg.overlays or refiner is not None or isinstance(_cam(cfg), DenseCam)  # a dense method's input
    dataset = ImageFolderDataset([(it.stem, it.path, it.labels) for it in todo], clip.patch_size, cfg.max_side,
                                 cfg.exif_transpose, keep_image=keep_image)
    loader = DataLoader(dataset, batch_sampler=size_batches(sizes, batch_size), collate_fn=collate_samples,
                        num_workers=decoders, pin_memory=device.type == "cuda")
    with crf_pool(refiner, cfg.crf_workers, decoders) as pool:
        with _stage(console, f"encoding the prompts of {len(class_set)} classes", dist_info.is_main):
            labeler = Labeler(clip, class_set, bg_power=cfg.bg_power, box_threshold=cfg.box_threshold,
                              attn_blocks=caa_blocks(cfg.caa_blocks, len(clip.visual.transformer.resblocks)),
                              zero_shot_threshold=cfg.zero_shot_threshold, max_side=cfg.max_side, tagger=cfg.tagger,
                              cam=_cam(cfg), refiner=refiner if pool is None else None)


        def crf(rgb, result: LabelResult) -> Future:
            return pool.submit(refiner.refine_image, rgb, result.cam_refined, result.labels, cfg.bg_power)

        with progress_bar(console, dist_info) as progress:
            run_batches(loader, {it.stem: it for it in todo}, batch_sizer(labeler, batch_size), out,
                         class_set.classes, summary, progress, lambda: out.flush(manifest),
                         None if pool is None else crf)


def label_folder(cfg: LabelConfig, console: Console | None = None, plan: LabelPlan | None = None) -> RunSummary:
    """Label every image of ``cfg.images`` into ``cfg.out``; images already done are skipped.

    ``plan`` is ``plan_label(cfg)``'s, when the caller made it (before importing this module, which loads
    torch). Under ``torchrun`` each rank takes every world-th image and rank 0 merges the records, so the
    output folder is the same as one process would write.
    """
    console = console or Console(stderr=True)
    plan = plan or plan_label(cfg, console)
    if plan.finished is not None:
        return plan.finished  # nothing to do: the folder is left as it is, and no model loads
    cfg = plan.cfg
    refiner = _refiner(cfg, plan.class_set)
    if refiner is not None:
        refiner.check()
    tagger_class(cfg.tagger)  # checked with given labels too, before anything is written
    _cam(cfg)
    device = resolve_device(cfg.device)
    choice = plan.dtype or resolve_dtype(cfg.dtype, device)
    with process_group(device) as (device, dist_info):
        return _label_folder(cfg, console, plan.items, plan.class_set, plan.given, choice, device, dist_info)


def _settings(cfg: LabelConfig, class_set, given, dtype_name: str) -> dict:
    """What shapes the masks, by meaning: ``base_settings`` and the methods' (tagger, refiner, CAM).

    Given labels are not here: each image's record holds its own, so an edited labels file redoes
    just the images whose labels changed.
    """
    # a tagger's settings hold its threshold when it has one (--zero-shot-threshold is the global tagger's)
    return {**base_settings(cfg, class_set, dtype_name),
            # a dense method labels without a tagger (its open-vocabulary mask)
            "tagger": None if (tagger := run_tagger(cfg.tagger, cfg.cam, given is not None)) is None
            else tagger_settings(tagger, class_set, cfg.zero_shot_threshold),
            "refiner": None if (refiner := _refiner(cfg, class_set)) is None else refiner.settings(),
            # GradCAM made every folder before CAM methods could be chosen: it is the absence of the key,
            # so that those folders resume; the manifest's options name the method either way
            **({} if (cam := _cam(cfg)).name == "gradcam" else {"cam": cam.settings()})}


def _load_model(cfg: LabelConfig, console: Console, device: torch.device, choice: DtypeChoice,
                dist_info: DistInfo) -> ClipModel:
    """The CLIP model in ``choice``'s dtype, a spinner meanwhile; the dtype (and why) is said once it loaded,
    so that weights that are missing are the first thing a user reads."""
    with _stage(console, f"loading the CLIP model on {device}", dist_info.is_main):
        clip = load_clip(cfg.model, device=device, dtype=choice.dtype)
    if dist_info.is_main:
        console.print(f"dtype: {choice.name} ({choice.reason})", highlight=False)
        slow = slow_low_precision(choice, device)
        if slow:
            console.print(f"[yellow]warning:[/] {escape(slow)}")
    return clip


def _label_folder(cfg: LabelConfig, console: Console, items, class_set, given, choice: DtypeChoice,
                  device: torch.device, dist_info: DistInfo) -> RunSummary:
    out = RunOutput(cfg.out, _settings(cfg, class_set, given, choice.name), save_cams=cfg.save_cams,
                    overlays=cfg.overlays, overwrite=cfg.overwrite, rank=dist_info.rank, world=dist_info.world)
    summary = RunSummary()
    todo = sort_items(cfg, items, class_set, given, out, summary)
    work, to_label = bool(todo), len(todo)  # the job's, not this rank's share: every rank takes the same path below
    todo = todo[dist_info.rank::dist_info.world]
    if not dist_info.is_main:
        summary.failed, summary.unlabelled = [], []  # rank 0 reports those for the job
    manifest = {"tool": "clipes label", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": str(cfg.images.resolve()), "options": options_record(cfg),
                "versions": _versions(), "device": str(device), "world_size": dist_info.world,
                "dtype": {"name": choice.name, "reason": choice.reason},
                # what an export checks: the run's inputs (never written over) and whether the run finished
                "inputs": {flag: os.path.abspath(p) for flag, p in input_files(cfg).items() if p is not None},
                "images": summary.skipped + to_label, "finished": False}
    if not work and not out.records and not cfg.overwrite:
        return summary  # nothing to write: the folder is left as it is (or never made)
    # the model is loaded before anything is written: a model that does not load leaves no trace.
    # Every rank loads it when the job has work (a rank whose share is empty too), then rank 0 takes
    # the folder (lock, --overwrite's clearing) before the others write; a failure on any rank stops
    # them all here instead of leaving them waiting for it at the next collective.
    clip, failure = None, None
    try:
        clip = _load_model(cfg, console, device, choice, dist_info) if work else None
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
            _label_todo(cfg, console, clip, todo, class_set, device, dist_info, out, manifest, summary)
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
