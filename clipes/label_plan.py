"""What ``clipes label`` checks before torch loads: flags, paths, class sets, labels files, outputs against
inputs, the dtype, a resume against the folder's manifest, and whether anything is left to do.

Everything here is answered in a fraction of a second: a mistake, a refused resume or a rerun with nothing
to do never waits for torch (seconds to import, more under load) or the model (tens of seconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from .defaults import CAA_BLOCKS, DTYPE_ENV, block_slice
from .errors import ClipesError
from .method_options import DENSE_CAMS, check_method_options, run_refiner, run_tagger
from .model_spec import check_checkpoint_path
from .output import OutputError, RunOutput, check_not_inputs, check_writable, named_file
from .precision import DTYPE_NAMES, DtypeChoice, resolve_dtype
from .prompts import ClassSet, builtin_class_sets
from .provenance import input_stamp, model_identity

__all__ = ["METHOD_OPTIONS", "LabelConfig", "LabelPlan", "RunSummary", "base_settings", "input_files", "lookup_labels",
           "plan_label", "sort_items"]


@dataclass
class LabelConfig:
    """Options of a labelling run (the CLI flags of ``clipes label``).

    ``batch_size`` None is automatic: 32 on a GPU, 4 on the CPU, halved on out-of-memory.
    ``workers`` None is automatic: up to 8 DataLoader processes per GPU, 1 on the CPU (see
    ``clipes.pipeline.decode_workers``). ``refine`` names the pixel refiner (``clipes.refiners``: crf, par;
    None: none); ``confidence`` is the CRF's option, ``par_bg_high`` / ``par_bg_low`` / ``par_iterations``
    PAR's (None: the refiner's default; PAR's iterations: 15 for COCO, 10 otherwise). ``crf_workers``
    0 is automatic: a process pool on the CPU cores that the DataLoader and the main process leave,
    when at least two are left, for a refiner that runs on the host (the CRF); else it runs in the
    main process. ``crf_backend`` runs the CRF with torch
    (on ``device``, batched) or pydensecrf (host CPU); None: torch on a GPU, pydensecrf on the CPU.
    ``cam`` names the CAM method (``clipes.cams``: gradcam, getam, or a dense method: maskclip, sclip,
    clearclip, naclip); ``getam_start`` is GETAM's first block (None: its default, 6). The ``dense_*``
    options tune a dense method's protocol (None: its authors'); its refiner is PAMR (NACLIP's default,
    ``pamr_iterations`` steps) or none.
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
    dense_scale: int | None = None
    dense_window: int | None = None
    dense_stride: int | None = None
    dense_logit_scale: float | None = None
    dense_prob: float | None = None
    pamr_iterations: int | None = None


@dataclass
class RunSummary:
    """What a run did: counts, the files it could not use (with why) and the time taken."""

    labelled: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Item:
    """An image to label: where it comes from, what it is now (``stamp``) and its given labels."""

    stem: str
    path: Path
    stamp: dict
    labels: list[int] | None
    given: list[str] | None


@dataclass
class LabelPlan:
    """A checked run: ``cfg`` (EXIF choice resolved), its images, class set and given labels (None:
    inferred), the dtype where it is known before torch (None: ``--device auto`` on a fresh folder), and
    ``finished``: the run's summary when nothing is left to do (no model needed), else None."""

    cfg: LabelConfig
    items: list[tuple[str, Path]]
    class_set: ClassSet
    given: dict[str, list[int]] | None
    dtype: DtypeChoice | None
    finished: RunSummary | None = None


# the options that shape a run's method entries (tagger, refiner, CAM) in its settings
METHOD_OPTIONS = ("refine", "confidence", "par_bg_high", "par_bg_low", "par_iterations", "crf_backend", "tagger",
                  "zero_shot_threshold", "cam", "getam_start", "dense_scale", "dense_window", "dense_stride",
                  "dense_logit_scale", "dense_prob", "pamr_iterations")
_REFUSE = "use --overwrite to redo it or choose another --out"


def lookup_labels(labels: dict[str, list[int]], stem: str) -> list[int] | None:
    """Labels of an image keyed by its relative stem or its bare file stem."""
    if stem in labels:
        return labels[stem]
    return labels.get(stem.rsplit("/", 1)[-1])


def input_files(cfg: LabelConfig) -> dict[str, Path | None]:
    """The files and folders a run reads, by flag: never written, by this run or by an export of it."""
    return {"the input folder": cfg.images, "--labels": cfg.labels, "--classes": named_file(cfg.classes),
            "--model": named_file(cfg.model), "--split-file": cfg.split_file}


def _input_name(path: Path, root: Path) -> str:
    """``path`` relative to the input folder as given (a symlink stays a file of the folder)."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return str(path)


def sort_items(cfg: LabelConfig, items, class_set: ClassSet, given, out: RunOutput,
               summary: RunSummary) -> list[Item]:
    """The images left to label; those done are counted in ``summary.skipped``, those without an entry in
    the given labels in ``summary.unlabelled`` and unreadable ones in ``summary.failed``."""
    todo: list[Item] = []
    for stem, path in items:
        labels = None if given is None else lookup_labels(given, stem)
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
    return todo


def base_settings(cfg: LabelConfig, class_set: ClassSet, dtype_name: str) -> dict[str, Any]:
    """The settings of a run that need no method object: a model by its content, a class set by its content."""
    classes = class_set.to_dict()
    if class_set.name not in builtin_class_sets():
        classes["name"] = None  # a user file's name is its file name: a copy elsewhere is the same set
    return {"model": model_identity(cfg.model), "classes": classes, "dtype": dtype_name, "bg_power": cfg.bg_power,
            "box_threshold": cfg.box_threshold if cfg.box_threshold is not None else class_set.box_threshold,
            "max_side": cfg.max_side, "exif_transpose": cfg.exif_transpose,
            # only another choice than CLIP-ES's is recorded: folders of earlier runs stay resumable
            **({"caa_blocks": cfg.caa_blocks} if cfg.caa_blocks != CAA_BLOCKS else {})}


def _inputs(cfg: LabelConfig, console: Console):
    """The images, class set, given labels and repeated split-file lines ``cfg`` names, each checked."""
    from .datasets import listed_images, load_split
    from .images import find_images
    from .labels import read_labels
    from .prompts import load_class_set

    if cfg.images is None:
        raise ClipesError("give a folder of images, or --dataset voc|coco with its root folder")
    if cfg.dataset:
        if cfg.classes not in ("voc", cfg.dataset):
            raise ClipesError(f"--dataset {cfg.dataset} comes with its own class set; drop --classes {cfg.classes}")
        split = load_split(cfg.dataset, cfg.images, cfg.split, cfg.split_file)
        if split.left_out:
            console.print(f"{split.left_out} image(s) of {split.name} have no label and are left out, as in the "
                          "authors' lists (--split-file names the images to take)", highlight=False)
        given = read_labels(cfg.labels, split.class_set) if cfg.labels else split.labels
        return split.items, split.class_set, given, split.repeated
    items, repeated = find_images(cfg.images), 0
    if cfg.split_file is not None:
        items, repeated = listed_images(items, cfg.split_file, str(cfg.images))
    class_set = load_class_set(cfg.classes)
    return items, class_set, read_labels(cfg.labels, class_set) if cfg.labels else None, repeated


def _manifest(cfg: LabelConfig) -> dict[str, Any] | None:
    """The folder's manifest when a resume would read it, else None (``RunOutput`` reports an unreadable one)."""
    if cfg.overwrite:
        return None
    try:
        data = json.loads((cfg.out / RunOutput.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("settings"), dict) else None


def dtype_before_torch(cfg: LabelConfig, manifest: dict[str, Any] | None) -> DtypeChoice | None:
    """``--dtype``; ``auto`` on a folder a run already labelled takes that run's dtype (its recorded
    settings); None where only torch can tell (``auto`` with ``--device auto``: is there a GPU?)."""
    name = cfg.dtype or os.environ.get(DTYPE_ENV) or "auto"
    previous = None if manifest is None else manifest["settings"].get("dtype")
    if name == "auto" and previous in DTYPE_NAMES:
        return DtypeChoice(previous, f"auto: the dtype {cfg.out} was labelled in")
    try:
        if name != "auto":
            return resolve_dtype(name, "cpu")  # as asked, on any device
        return None if cfg.device == "auto" else resolve_dtype(name, cfg.device)
    except ValueError as e:
        raise ClipesError(str(e)) from None


def _method_names(cfg: LabelConfig, given) -> dict[str, str | None]:
    return {"refiner": run_refiner(cfg.refine, cfg.cam), "tagger": run_tagger(cfg.tagger, cfg.cam, given is not None),
            "cam": cfg.cam}


def _recorded_names(settings: dict[str, Any]) -> dict[str, str | None]:
    def name(entry: Any, absent: str | None) -> str | None:
        return entry.get("name") if isinstance(entry, dict) else absent

    # GradCAM made every folder before CAM methods could be chosen: its settings have no "cam" key
    return {"refiner": name(settings.get("refiner"), None), "tagger": name(settings.get("tagger"), None),
            "cam": name(settings.get("cam"), "gradcam")}


def _entry_options(cfg: LabelConfig) -> dict[str, tuple[str, ...]]:
    """The options behind each method entry of the settings (a dense method's PAMR steps follow --refine)."""
    return {"tagger": ("tagger", "zero_shot_threshold"),
            "refiner": ("refine", "confidence", "par_bg_high", "par_bg_low", "par_iterations", "crf_backend",
                        "pamr_iterations"),
            "cam": ("cam", "getam_start", "dense_scale", "dense_window", "dense_stride", "dense_logit_scale",
                    "dense_prob", *(("refine",) if cfg.cam in DENSE_CAMS else ()))}


def check_resume(cfg: LabelConfig, manifest: dict[str, Any], base: dict[str, Any], given) -> None:
    """Refuse, before torch, a folder whose run was made with other settings, as far as they can be told
    without the methods' modules: every setting but the methods' parameters (``RunOutput`` checks those).
    Once refused, the message also names the method entries whose recorded options differ."""
    previous = manifest["settings"]
    methods = _method_names(cfg, given)
    changed = {k for k in base.keys() | previous.keys() - methods.keys() if base.get(k) != previous.get(k)} | \
              {k for k, v in _recorded_names(previous).items() if v != methods[k]}
    options = manifest.get("options")
    if changed and isinstance(options, dict):
        changed |= {entry for entry, keys in _entry_options(cfg).items()
                    if methods[entry] is not None and any(options.get(k) != getattr(cfg, k) for k in keys)}
    if changed:
        raise OutputError(f"{cfg.out} holds a run made with other settings ({', '.join(sorted(changed))}); {_REFUSE}")


def _clipes_version() -> str | None:
    try:
        return version("clipes")
    except PackageNotFoundError:
        return None


def recorded_method_settings(cfg: LabelConfig, manifest: dict[str, Any], given) -> dict[str, Any] | None:
    """The method entries (tagger, refiner, CAM) of the folder's recorded settings when this run would make
    the same ones: the same clipes version, the same options that shape them (and, for the CRF's default
    backend, the same named device); else None, and the methods' modules decide."""
    options, settings = manifest.get("options"), manifest["settings"]
    versions = manifest.get("versions")
    if not isinstance(options, dict) or not isinstance(versions, dict) or versions.get("clipes") != _clipes_version():
        return None
    if any(options.get(k, object()) != getattr(cfg, k) for k in METHOD_OPTIONS):
        return None
    same_device = cfg.device != "auto" and options.get("device") == cfg.device
    if cfg.refine == "crf" and cfg.crf_backend is None and not same_device:
        return None  # the CRF's default backend follows the device (torch on a GPU)
    if (settings.get("tagger") is None) != (run_tagger(cfg.tagger, cfg.cam, given is not None) is None):
        return None
    return {k: settings[k] for k in ("tagger", "refiner", "cam") if k in settings}


def _merged(out: Path) -> bool:
    """Whether the last run's records are all in ``labels.json``: no rank's journal left, and ``labels.json``
    written after the journal (a run merges them at its end; a kill or a deleted file leaves it to redo)."""
    state = out / RunOutput.STATE
    try:
        labels, journal = (out / RunOutput.LABELS).stat(), (state / "records.jsonl").stat()
    except OSError:
        return False
    return labels.st_mtime_ns >= journal.st_mtime_ns and not any(state.glob("records.rank*.jsonl"))


def _finished(cfg: LabelConfig, manifest: dict[str, Any], settings: dict[str, Any], items, class_set,
              given) -> RunSummary | None:
    """The summary of a rerun with nothing to do, or None. Only a finished folder (its last run merged its
    records: a summary in its manifest, ``_merged``) is left as it is."""
    if "summary" not in manifest or not _merged(cfg.out):
        return None
    out = RunOutput(cfg.out, settings, save_cams=cfg.save_cams, overlays=cfg.overlays)
    summary = RunSummary()
    todo = sort_items(cfg, items, class_set, given, out, summary)
    return None if todo or not summary.skipped else summary


def plan_label(cfg: LabelConfig, console: Console) -> LabelPlan:
    """Check everything of ``cfg`` that needs no model, without importing torch."""
    items, class_set, given, repeated = _inputs(cfg, console)
    if cfg.exif_transpose is None:  # a dataset's annotations are of the pixels as stored (as the authors read them)
        cfg = replace(cfg, exif_transpose=not cfg.dataset)
    block_slice(cfg.caa_blocks)
    check_method_options(cfg.refine, cfg.cam, cfg.tagger, crf_backend=cfg.crf_backend, confidence=cfg.confidence,
                         bg_high=cfg.par_bg_high, bg_low=cfg.par_bg_low, iterations=cfg.par_iterations,
                         start=cfg.getam_start, scale=cfg.dense_scale, window=cfg.dense_window,
                         stride=cfg.dense_stride, logit_scale=cfg.dense_logit_scale, prob_threshold=cfg.dense_prob,
                         pamr_iterations=cfg.pamr_iterations)
    check_checkpoint_path(cfg.model)
    if repeated:
        console.print(f"note: --split-file {escape(str(cfg.split_file))} names {repeated} image(s) again; each is "
                      "labelled once", highlight=False)
    check_not_inputs({"--out": cfg.out}, input_files(cfg))
    check_writable(cfg.out)
    manifest = _manifest(cfg)
    dtype = dtype_before_torch(cfg, manifest)
    plan = LabelPlan(cfg, items, class_set, given, dtype)
    if manifest is not None and dtype is not None:
        base = base_settings(cfg, class_set, dtype.name)
        check_resume(cfg, manifest, base, given)
        methods = recorded_method_settings(cfg, manifest, given)
        if methods is not None:
            plan.finished = _finished(cfg, manifest, {**base, **methods}, items, class_set, given)
    return plan


def options_record(cfg: LabelConfig) -> dict[str, Any]:
    """``cfg`` as the manifest records it (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
