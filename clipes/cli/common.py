"""What every command shares: user errors as one red line and exit status 2, and option checks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import ClipesError
from ..jsonfile import read_json
from ..prompts import ClassSet, ClassSetError, builtin_class_sets, class_set_from_dict, load_class_set

# Output that is not a terminal (a pipe, a file, a CI log) is not cut into lines: rich would wrap it at 80
# columns, splitting a long path mid-word and folding tables. COLUMNS, when set, still decides.
UNWRAPPED_WIDTH = 10_000


def make_console(stderr: bool = True) -> Console:
    """The rich console of a command: as wide as the terminal, or unwrapped when output is not a terminal."""
    console = Console(stderr=stderr)
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(stderr=stderr, width=UNWRAPPED_WIDTH, soft_wrap=True)


@contextmanager
def reported_errors(console: Console, *also: type[Exception]) -> Iterator[None]:
    """Turn a ``ClipesError`` (or ``also``) into one message and exit status 2, without a traceback."""
    try:
        yield
    except (ClipesError, *also) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Click's usage errors (bad option values, unknown options) as the same one ``error:`` line.

    Typer vendors its own click, whose exceptions are public only as ``typer.TyperException``: usage
    errors are those with exit status 2 (``clipes`` alone raises one after printing the help; kept).
    """
    try:
        yield
    except typer.TyperException as e:
        if getattr(e, "exit_code", None) != 2 or type(e).__name__ == "NoArgsIsHelpError":
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        make_console().print(f"[bold red]error:[/] {escape(e.format_message())}{escape(hint)}",
                                   highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


class OneLineErrorGroup(TyperGroup):
    """A Typer group whose usage errors print as one ``error:`` line instead of a usage panel."""

    def make_context(self, info_name, args, parent=None, **extra) -> typer.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: typer.Context):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def finite(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[float | None], float | None]:
    """A Typer callback refusing NaN, infinities and values outside the range (click's ranges let NaN pass)."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        wanted = _range_text(low, high, low_open, high_open)
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value:g} is not a finite number {wanted}")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise typer.BadParameter(f"{value:g} is not {wanted}")
        return value
    return check


# The smallest --max-side: two ViT-B/16 patches. With one patch the CAM is constant and every mask all
# background (measured: --max-side 16 gives a 1x1 grid and an all-0 mask), and TagCLIP skips every image.
MIN_MAX_SIDE = 32


def max_side_option(value: int) -> int:
    """A Typer callback for ``--max-side``: 0 (off) or at least ``MIN_MAX_SIDE`` pixels."""
    if value != 0 and value < MIN_MAX_SIDE:
        raise typer.BadParameter(f"{value} is neither 0 (off) nor at least {MIN_MAX_SIDE} pixels (two patches)")
    return value


def batch_size_option(value: str) -> str:
    """A Typer callback for ``--batch-size``: a positive integer or ``auto``."""
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise typer.BadParameter(f"{value!r} is neither a positive integer nor 'auto'")
    return value


def positive_floats(text: str, example: str = "1,2") -> list[float]:
    """Comma-separated finite numbers > 0 (such as background powers), or a ``typer.BadParameter``."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(f"{part.strip()!r} in {text!r} is not a number; give comma-separated "
                                     f"numbers > 0 such as {example}") from None
        if not math.isfinite(value) or value <= 0:
            raise typer.BadParameter(f"{part.strip()!r} in {text!r}: each value must be a finite number > 0")
        values.append(value)
    return values


def write_output(path: Path, data: bytes, flag: str) -> None:
    """Write an output file the user named with ``flag`` atomically, creating its folder; a clear error
    naming the flag for a folder in its place, a file in the way or an unwritable place."""
    from ..output import atomic_write  # not at the top: clipes.output loads torch, which --help does without

    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ClipesError(f"{flag} {path}: {blocking} is a file, not a folder")
    if path.is_dir():
        raise ClipesError(f"{flag} {path}: is a folder; give a file name")
    try:
        atomic_write(path, data)
    except (OSError, ClipesError) as e:
        raise ClipesError(f"{flag} {path}: {e}") from None


def run_class_set(run: Path, classes: str | None, default: str) -> ClassSet:
    """``--classes`` if given, else the class set a clipes run recorded in its manifest, else ``default``."""
    manifest = run / "manifest.json"
    if classes is not None or not manifest.is_file():
        return load_class_set(classes or default)
    settings = read_json(manifest, "run manifest").get("settings")
    saved = settings.get("classes") if isinstance(settings, dict) else None
    if not isinstance(saved, dict):
        raise ClipesError(f"{manifest}: records no class set (settings.classes); give --classes")
    if saved.get("name") in builtin_class_sets():
        builtin = load_class_set(saved["name"])  # with its aliases, which a manifest does not record
        if "classes" not in saved or saved["classes"] == list(builtin.classes):
            return builtin
    try:
        return class_set_from_dict(saved)
    except ClassSetError as e:
        raise ClassSetError(f"{manifest}: {e}") from None


def _cam_name(value: str) -> str:
    from ..method_options import CAM_FLAGS  # the names, without torch

    if value not in CAM_FLAGS:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(CAM_FLAGS)}")
    return value


# the CAM method of the pseudo masks (clipes.cams), for every command that makes them
CamOption = Annotated[str, typer.Option(
    help="How the class maps are made: gradcam (CLIP-ES's softmax-GradCAM on the last block) or getam (GETAM: "
         "every block's attention times its gradient, from --getam-start on; gradients through those blocks); "
         "or a forward-only dense method making the masks itself under its authors' protocol: maskclip, sclip, "
         "clearclip, naclip (without --labels: open-vocabulary masks, no tagger).",
    callback=_cam_name)]
# a dense method's protocol (clipes.cams.dense): None keeps its authors' setting
DenseScaleOption = Annotated[int | None, typer.Option(
    help="With a dense --cam: the short side the image is resized to \\[default: the authors', 336 sclip/naclip, "
         "448 maskclip/clearclip].", show_default=False, callback=finite(16))]
DenseWindowOption = Annotated[int | None, typer.Option(
    help="With a dense --cam: sliding-window side in pixels, 0 for the whole image \\[default: 224 sclip, 448 "
         "maskclip/clearclip, 0 naclip].", show_default=False, callback=finite(0))]
DenseStrideOption = Annotated[int | None, typer.Option(
    help="With a dense --cam: sliding-window stride \\[default: 112 sclip/naclip, 224 maskclip/clearclip].",
    show_default=False, callback=finite(1))]
DenseLogitScaleOption = Annotated[float | None, typer.Option(
    help="With a dense --cam: the softmax's logit scale \\[default: 65 sclip, 40 naclip, 50 maskclip/clearclip].",
    show_default=False, callback=finite(0, low_open=True))]
DenseProbOption = Annotated[float | None, typer.Option(
    help="With a dense --cam: a pixel whose winning probability is below this is background \\[default: 0.1 "
         "sclip/naclip, 0.5 maskclip/clearclip].", show_default=False, callback=finite(0, 1))]
PamrIterationsOption = Annotated[int | None, typer.Option(
    help="With --refine pamr (NACLIP's default): propagation steps \\[default: 10].", show_default=False,
    callback=finite(1))]
GetamStartOption = Annotated[int | None, typer.Option(
    help="With --cam getam: the first block summed, 0 (every block) or more \\[default: 6, the authors'].",
    show_default=False, callback=finite(0))]
