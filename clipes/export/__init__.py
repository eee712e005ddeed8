"""A run's pseudo masks in the formats annotation tools and trainers read: COCO RLE, CVAT, Hugging Face.

``open_run`` checks the run (reading only), ``export_run`` checks ``out`` and writes the export whole
or not at all (see ``target``). Each format is its own module: ``coco``, ``cvat``, ``hf``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ClipesError
from .coco import check_min_area, coco_json
from .cvat import write_cvat
from .hf import write_hf
from .runfolder import ExportRun, RunImage, check_run_folder, open_run
from .target import MARKER, FolderSink, ZipSink, check_target, export_identity, staged_file, staged_folder

__all__ = ["FORMATS", "IMAGE_MODES", "ExportRun", "RunImage", "check_min_area", "check_options", "check_run_folder",
           "export_run", "open_run"]

FORMATS = ("coco", "cvat", "hf")
IMAGE_MODES = ("none", "link", "copy")
# what each format does with the photos unless --images says: CVAT's task holds them already; a
# dataset row names its photo
_DEFAULT_IMAGES = {"cvat": "none", "hf": "link"}


def check_options(fmt: str, images: str | None, instances: bool, ignore_category: bool) -> None:
    """A ClipesError for options the format does not take."""
    if fmt not in FORMATS:
        raise ClipesError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if images is not None and images not in IMAGE_MODES:
        raise ClipesError(f"--images {images!r}: choose one of {', '.join(IMAGE_MODES)}")
    if fmt == "coco" and images is not None:
        raise ClipesError("--images goes with --format cvat or hf (a COCO JSON names its photos by file_name)")
    if fmt != "coco" and (instances or ignore_category):
        flag = "--instances" if instances else "--ignore-category"
        raise ClipesError(f"{flag} goes with --format coco (cvat and hf keep the run's masks, 255 where ignored)")


def export_run(run: ExportRun, fmt: str, out: Path, *, images: str | None = None, instances: bool = False,
               ignore_category: bool = False, overwrite: bool = False, min_area: int | None = None,
               advance: Callable[[], None] = lambda: None) -> None:
    """Write ``run`` as ``fmt`` to ``out``: a COCO JSON file, a CVAT folder (or ``.zip``), an HF dataset folder.

    ``out`` is checked first (not the run, its photos or the files it read; writable; replacing only an
    earlier export of this run, or with ``overwrite`` any clipes export: see ``target.check_target``);
    each export records what it is (``target.export_identity``). ``advance`` is called once an image.
    """
    check_options(fmt, images, instances, ignore_category)
    check_min_area(fmt, instances, min_area)
    images = images or _DEFAULT_IMAGES.get(fmt)
    zipped = fmt == "cvat" and out.suffix.lower() == ".zip"
    folder = fmt == "hf" or (fmt == "cvat" and not zipped)
    identity = export_identity(fmt, run.root)
    check_target(out, {"the input folder": run.root, **run.inputs}, folder, identity, overwrite, f"{fmt} export")
    marker = (json.dumps(identity, indent=1) + "\n").encode()
    if fmt == "coco":
        data = coco_json(run, instances=instances, ignore_category=ignore_category, min_area=min_area,
                         advance=advance)
        data["info"] = {"clipes_export": identity, **data["info"]}  # first: target.read_identity looks there
        with staged_file(out) as tmp:
            tmp.write_bytes(json.dumps(data, separators=(",", ":")).encode())
    elif zipped:
        with staged_file(out) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            write_cvat(run, ZipSink(archive), images, advance)
            archive.writestr(MARKER, marker)
    elif fmt == "cvat":
        with staged_folder(out) as tmp:
            write_cvat(run, FolderSink(tmp), images, advance)
            (tmp / MARKER).write_bytes(marker)
    else:
        with staged_folder(out) as tmp:
            write_hf(run, tmp, images, advance)
            (tmp / MARKER).write_bytes(marker)
