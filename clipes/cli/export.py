"""``clipes export``: a run's pseudo masks as COCO RLE JSON, a CVAT segmentation-mask folder or an HF dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..defaults import MIN_AREA
from .common import make_console, reported_errors, run_class_set

_FORMATS = ("coco", "cvat", "hf")  # clipes.export.FORMATS, spelt here so that --help imports nothing heavy
_IMAGE_MODES = ("none", "link", "copy")


def _choice(options: tuple[str, ...]):
    def check(value: str | None) -> str | None:
        if value is not None and value not in options:
            raise typer.BadParameter(f"{value!r}: choose one of {', '.join(options)}")
        return value
    return check


def export_command(
    run: Annotated[Path, typer.Argument(help="A clipes output folder (from clipes label); only read.")],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="coco (instances JSON, RLE masks), cvat (Segmentation mask 1.1 folder, or a .zip "
                               "with --out NAME.zip) or hf (datasets.Dataset saved with save_to_disk).",
        callback=_choice(_FORMATS), show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="The JSON file (coco), folder or .zip (cvat), or folder (hf) to write; outside the run. "
                            "An earlier export of this run there is replaced.", show_default=False)],
    images: Annotated[str | None, typer.Option(
        help="The photos: none, link or copy. cvat: into JPEGImages/ \\[default: none]; hf: link keeps their "
             "paths, copy stores them in the dataset \\[default: link].", callback=_choice(_IMAGE_MODES),
        show_default=False)] = None,
    instances: Annotated[bool, typer.Option(
        "--instances", help="coco: one annotation per connected region (8-connected) instead of per class.")] = False,
    min_area: Annotated[int | None, typer.Option(
        help=f"coco --instances: leave out regions under this many pixels (0 keeps every region) \\[default: "
             f"{MIN_AREA}].", show_default=False, min=0)] = None,
    ignore_category: Annotated[bool, typer.Option(
        "--ignore-category", help="coco: ignored pixels (255) as crowd annotations of an extra 'ignore' category "
                                  "(else left out).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an export of another run or format at --out (an export of this run is "
                            "replaced anyway); never a folder clipes export did not write.")] = False,
    partial: Annotated[bool, typer.Option(
        "--partial", help="Export what is done of a run still being written or interrupted (refused without).")]
    = False,
) -> None:
    """Export a run's pseudo masks for annotation tools (CVAT, Label Studio, FiftyOne) and trainers."""
    from ..export import check_min_area, check_options, check_run_folder, export_run, open_run

    console = make_console()
    with reported_errors(console):
        check_options(fmt, images, instances, ignore_category)
        check_min_area(fmt, instances, min_area)
        check_run_folder(run)
        source = open_run(run, run_class_set(run, None, "voc"), partial=partial)
        if source.partial is not None:
            console.print(f"note: {escape(source.partial)}", highlight=False, soft_wrap=True)
        start = time.perf_counter()
        with Progress(TextColumn(f"[bold]exporting {fmt}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("export", total=len(source.images))
            export_run(source, fmt, out, images=images, instances=instances, ignore_category=ignore_category,
                       overwrite=overwrite, min_area=min_area, advance=lambda: progress.advance(task))
        seconds = time.perf_counter() - start
    console.print(f"exported {len(source.images)} image(s) of {escape(str(run))} as {fmt} in {seconds:.1f}s -> "
                  f"{escape(str(out))}", highlight=False)
