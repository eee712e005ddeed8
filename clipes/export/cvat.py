"""A run's masks in the layout CVAT imports as "Segmentation mask 1.1" (Pascal VOC segmentation, Datumaro).

``labelmap.txt`` names every label with its colour (the VOC palette the masks already use: background
0,0,0, class c the palette's colour c + 1); ``SegmentationClass/<stem>.png`` are the run's masks;
``ImageSets/Segmentation/default.txt`` lists the stems; the photos go to ``JPEGImages/`` on request.
CVAT refuses a mask colour its label map does not declare, so ignored pixels (255) get an ``ignore``
label when a mask holds any.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ClipesError
from ..masks import IGNORE, mask_to_png, voc_palette
from ..output import encode_image
from .runfolder import ExportRun

__all__ = ["BACKGROUND", "IGNORE_LABEL", "LABELMAP", "SEGMENTATION", "labelmap", "read_labelmap", "write_cvat"]

LABELMAP = "labelmap.txt"
SEGMENTATION = "SegmentationClass"
IMAGE_LIST = "ImageSets/Segmentation/default.txt"
IMAGES = "JPEGImages"
BACKGROUND = "background"
IGNORE_LABEL = "ignore"


def _line(name: str, value: int) -> str:
    r, g, b = (int(c) for c in voc_palette()[value])
    return f"{name}:{r},{g},{b}::\n"


def labelmap(names: tuple[str, ...], with_ignore: bool) -> str:
    """``labelmap.txt``: ``label:r,g,b:parts:actions`` for background, each class and (if used) ``ignore``."""
    text = "# label:color_rgb:parts:actions\n" + _line(BACKGROUND, 0)
    text += "".join(_line(n, c + 1) for c, n in enumerate(names))
    return text + (_line(IGNORE_LABEL, IGNORE) if with_ignore else "")


def read_labelmap(path: Path) -> dict[str, tuple[int, int, int]]:
    """Label name -> RGB colour from a ``labelmap.txt`` (as CVAT and Datumaro read it)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, colour = line.split(":")[:2]
        out[name] = tuple(int(c) for c in colour.split(","))
    return out


def _unprintable(text: str) -> str | None:
    """The first control character (a newline, a tab, DEL...) of ``text`` as Python writes it, or None."""
    bad = next((c for c in text if ord(c) < 32 or 127 <= ord(c) < 160), None)
    return None if bad is None else repr(bad)


def _label_problem(name: str) -> str | None:
    """Why CVAT and Datumaro would misread ``name`` as a ``labelmap.txt`` label, or None."""
    if name.lower() in (BACKGROUND, IGNORE_LABEL):
        return f"{BACKGROUND!r} and {IGNORE_LABEL!r} are taken"
    if ":" in name:
        return "':' separates the fields of labelmap.txt"
    if name.startswith("#"):
        return "a line starting with '#' is a comment in labelmap.txt"
    if (bad := _unprintable(name)) is not None:
        return f"it holds the control character {bad}"
    if name != name.strip() or not name:
        return "labelmap.txt readers strip spaces at the ends of a name"
    return None


def _check_names(run: ExportRun) -> None:
    """Refuse class names that labelmap.txt cannot carry and image stems that a zip member name, a file name
    on Windows or the image list (one stem a line) cannot: each refusal says why."""
    for name in run.class_set.classes:
        problem = _label_problem(name)
        if problem is not None:
            raise ClipesError(f"--format cvat: class {name!r} of {run.class_set.name!r} cannot be a CVAT label "
                              f"({problem}); rename it in the class set")
    for image in run.images:
        problem = "a backslash, which zip readers and Windows take as a folder separator" if "\\" in image.stem \
            else None if (bad := _unprintable(image.stem)) is None else f"the control character {bad}"
        if problem is not None:
            raise ClipesError(f"--format cvat: the image {image.stem!r} ({image.file!r}) has {problem} in its "
                              f"name, which {IMAGE_LIST} and the export's file names cannot carry; rename the "
                              "photo and label it again")


def write_cvat(run: ExportRun, sink, images: str = "none", advance: Callable[[], None] = lambda: None) -> None:
    """Write the run into ``sink`` (``target.FolderSink`` or ``ZipSink``); ``images``: none, link or copy."""
    _check_names(run)
    if images != "none":
        missing = [run.image_path(im) for im in run.images if not run.image_path(im).is_file()]
        if missing:
            raise ClipesError(f"--images {images}: {len(missing)} photo(s) are not where the run read them "
                              f"(e.g. {missing[0]}); export without --images, or move them back")
    with_ignore = False
    for image, mask in run.masks():
        with_ignore = with_ignore or bool((mask == IGNORE).any())
        # encoded anew with the VOC palette, whose colours labelmap.txt declares, whatever the file's palette
        sink.put(f"{SEGMENTATION}/{image.stem}.png", encode_image(mask_to_png(mask)))
        if images != "none":
            source = run.image_path(image)
            sink.add_file(f"{IMAGES}/{image.stem}{source.suffix.lower()}", source, link=images == "link")
        advance()
    sink.put(IMAGE_LIST, "".join(f"{im.stem}\n" for im in run.images).encode())
    sink.put(LABELMAP, labelmap(run.class_set.classes, with_ignore).encode())
