"""``clipes view``: a static HTML page of a run, sortable by per-image IoU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .common import finite, make_console, reported_errors, run_class_set


def view_command(
    out: Annotated[Path, typer.Argument(help="A clipes output folder (from clipes label).")],
    gt: Annotated[Path | None, typer.Option(help="Ground truth (label PNG folder or COCO JSON) for per-image IoU.")
                  ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images (by name), N >= 1 \\[default: all].",
                                              callback=finite(1), show_default=False)] = None,
) -> None:
    """Write OUT/view/index.html: photo, pseudo mask, CAMs per class and, with --gt, IoU per image."""
    from ..evaluate import open_ground_truth
    from ..output import check_not_inputs
    from ..view import build_view

    console = make_console()
    with reported_errors(console):
        check_not_inputs({"the page folder": out / "view"}, {"--gt": gt, "OUT's masks": out / "masks"})
        truth = None
        if gt is not None:
            truth = open_ground_truth(gt, run_class_set(out, None, "coco" if gt.suffix.lower() == ".json" else "voc"))
        page = build_view(out, truth, limit)
    console.print(f"wrote {escape(str(page))}", highlight=False)
