"""A static HTML page to look through a labelling run: image, mask overlay, CAMs, per-image IoU."""

from __future__ import annotations

import html
import zipfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image
from rich.progress import Progress

from .errors import ClipesError
from .evaluate import check_pair, confusion, read_label_png, scores
from .export.target import staged_folder
from .images import ImageError, read_image
from .jsonfile import read_json, read_run_labels
from .masks import overlay, voc_palette
from .output import atomic_write, encode_image

__all__ = ["build_view", "heatmap"]

_ANCHORS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], np.float32)


def heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A CAM in [0, 1] coloured blue to red (jet-like) and blended over an RGB image."""
    pos = np.clip(cam, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    colour = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return ((1 - alpha) * image.astype(np.float32) + alpha * colour).round().astype(np.uint8)


def _thumb(arr: np.ndarray | Image.Image, size: int) -> bytes:
    img = Image.fromarray(arr) if isinstance(arr, np.ndarray) else arr
    img = img.convert("RGB")
    img.thumbnail((size, size))
    return encode_image(img, "JPEG", quality=85)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>clipes: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }}
th {{ cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }}
th.sorted::after {{ content: " \\25B4"; }} th.sorted.desc::after {{ content: " \\25BE"; }}
img {{ display: block; max-width: 320px; }} .cams {{ display: flex; gap: 4px; flex-wrap: wrap; }}
.cams figure {{ margin: 0; }} figcaption, .note {{ font-size: 12px; color: #555; }}
.swatch {{ display: inline-block; width: 10px; height: 10px; margin-right: 3px; border: 1px solid #999; }}
.legend span {{ margin-right: 1em; white-space: nowrap; }}
</style></head><body>
<h1>{title}</h1><p>{summary}</p>
<p class="legend">Mask colours: {legend}</p>
<p class="note">Click a column's header to sort by it (ascending), again for descending: photo by its size, pseudo
mask and ground truth by their share of foreground pixels, CAMs by their number. Rows without a value (an image
without ground truth) stay last either way.</p>
<table id="runs"><thead><tr>
<th data-type="text">image</th><th data-type="num">IoU</th><th data-type="text">labels</th>
<th data-type="text">source</th><th data-type="num">photo</th><th data-type="num">pseudo mask</th>{gt_header}
<th data-type="num">CAMs (refined)</th>
</tr></thead><tbody>
{rows}
</tbody></table>
<script>
const table = document.getElementById("runs");
table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {{
  const body = table.tBodies[0], rows = Array.from(body.rows), num = th.dataset.type === "num";
  const desc = th.classList.contains("sorted") && !th.classList.contains("desc");
  const key = r => num ? parseFloat(r.cells[col].dataset.v) : r.cells[col].innerText;
  rows.sort((a, b) => {{
    const x = key(a), y = key(b);
    if (num && (isNaN(x) || isNaN(y))) return isNaN(x) - isNaN(y);  // no value: last in both directions
    const c = num ? x - y : x.localeCompare(y);
    return desc ? -c : c;
  }});
  table.querySelectorAll("th").forEach(h => h.classList.remove("sorted", "desc"));
  th.classList.add("sorted"); if (desc) th.classList.add("desc");
  rows.forEach(r => body.appendChild(r));
}}));
{initial_sort}
</script></body></html>
"""

# what the mask value 255 means in a clipes run (and in VOC ground truth)
_IGNORED = "255: ignored (a pixel refiner's uncertain pixels; void in ground truth), not scored by clipes eval"


def _swatch(colour) -> str:
    return f'<span class="swatch" style="background: rgb{tuple(int(x) for x in colour)}"></span>'


def _foreground(mask: np.ndarray) -> tuple[float, str]:
    """The share of foreground pixels (not 0, not 255) in percent, and a caption with the ignored share."""
    fg = 100 * float(((mask != 0) & (mask != 255)).mean())
    ignored = 100 * float((mask == 255).mean())
    return fg, f"foreground {fg:.1f}%" + (f", 255 {ignored:.1f}%" if ignored else "")


def _value_name(value: int, names: list[str]) -> str:
    if value == 0:
        return "0: background"
    if value == 255:
        return _IGNORED
    return f"{value}: {names[value - 1]}" if value - 1 < len(names) else str(value)


def _palette_mask(mask: np.ndarray) -> Image.Image:
    img = Image.fromarray(mask, "P")
    img.putpalette(voc_palette().tobytes())
    return img


def read_cams(path: Path) -> list[tuple[int, np.ndarray]]:
    """(class, refined CAM) pairs of a run's ``cams/<stem>.npz``: integer classes, one 2-D map of numbers each;
    a one-line error naming the file for anything else (a file edited or not made by clipes)."""
    try:
        with np.load(path) as data:
            labels, cams = data["labels"], data["cam_refined"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ClipesError(f"{path}: cannot read saved CAMs ({type(e).__name__}: {e})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ClipesError(f"{path}: 'labels' must be a list of class numbers, not {labels.dtype} of shape "
                          f"{labels.shape}")
    if cams.ndim != 3 or len(cams) != len(labels) or not np.issubdtype(cams.dtype, np.number):
        raise ClipesError(f"{path}: 'cam_refined' must hold one 2-D map of numbers per label ({len(labels)}), not "
                          f"{cams.dtype} of shape {cams.shape}")
    return [(int(c), cam) for c, cam in zip(labels, cams, strict=True)]


def build_view(run: Path, gt=None, limit: int | None = None, thumb: int = 320) -> Path:
    """Write ``run/view/index.html`` with thumbnails; rows sortable, worst IoU first when ``gt`` is given.

    Every image of ``labels.json`` with a mask gets a row; one whose photo is not where the manifest's
    input folder says (moved, or labelled from another folder into the same run) shows its mask alone.
    Thumbnails mirror the stems' folders (``photo/a/b.jpg``), so no two images share one.
    """
    if limit is not None and limit < 1:
        raise ClipesError(f"--limit {limit}: give a number of images, at least 1")
    manifest_path, labels_path = run / "manifest.json", run / "labels.json"
    if not manifest_path.is_file() or not labels_path.is_file():
        raise ClipesError(f"{run} is not a clipes output folder (no manifest.json / labels.json)")
    manifest = read_json(manifest_path, "run manifest")
    records = read_run_labels(labels_path)
    settings = manifest.get("settings") if isinstance(manifest.get("settings"), dict) else {}
    source = Path(str(manifest.get("input", "")))
    classes = settings.get("classes") if isinstance(settings.get("classes"), dict) else {}
    names = [str(n) for n in classes.get("classes", [])] if isinstance(classes.get("classes"), list) else []
    palette = voc_palette()
    # built aside and put in place whole: a refusal half-way (a damaged mask or CAM file) leaves the
    # earlier page as it was, and no thumbnails of images gone since stay behind
    with staged_folder(run / "view") as view:
        rows, ious, no_photo, pooled, used = [], [], 0, None, set()
        stems = sorted(records)[:limit]
        with Progress(transient=True) as progress:
            for stem in progress.track(stems, description="building view"):
                rec = records[stem]
                mask_path = run / "masks" / f"{stem}.png"
                if not mask_path.is_file():
                    continue
                mask = read_label_png(mask_path)
                image, note = None, ""
                image_path = source / str(rec["file"]) if "file" in rec else None
                if image_path is None or not image_path.is_file():
                    note = f"photo not found ({image_path or 'no file recorded'})"
                else:
                    try:
                        image = np.asarray(read_image(image_path, settings.get("exif_transpose", True)).convert("RGB"))
                    except ImageError as e:
                        note = f"photo unreadable ({e})"
                    if image is not None and image.shape[:2] != mask.shape:
                        image, note = None, f"photo {image_path} is no longer the labelled one (another size)"
                no_photo += image is None
                iou, truth = float("nan"), None
                if gt is not None and stem in gt:
                    n = len(names) + 1
                    truth = gt.mask(stem)
                    check_pair(mask, truth, n, str(mask_path), gt.where(stem))
                    hist = confusion(mask, truth, n)
                    pooled = hist if pooled is None else pooled + hist
                    iou = scores(hist).miou
                    ious.append(iou)
                src = {kind: html.escape(quote(f"{kind}/{stem}.jpg")) for kind in ("photo", "mask", "gt")}
                used.update(int(v) for v in np.unique(mask))
                if image is not None:
                    atomic_write(view / "photo" / f"{stem}.jpg", _thumb(image, thumb))
                    atomic_write(view / "mask" / f"{stem}.jpg", _thumb(overlay(Image.fromarray(image), mask), thumb))
                    photo_html = (f'<td data-v="{mask.size}"><img src="{src["photo"]}" alt="photo">'
                                  f'<span class="note">{mask.shape[1]} × {mask.shape[0]}</span></td>')
                else:
                    atomic_write(view / "mask" / f"{stem}.jpg", _thumb(_palette_mask(mask), thumb))
                    photo_html = f'<td data-v="NaN"><em>{html.escape(note)}</em></td>'
                fg, caption = _foreground(mask)
                mask_html = (f'<td data-v="{fg}"><img src="{src["mask"]}" alt="mask">'
                             f'<span class="note">{caption}</span></td>')
                gt_html = ""
                if gt is not None and truth is None:
                    gt_html = '<td data-v="NaN"><span class="note">no ground truth</span></td>'
                elif gt is not None:
                    used.update(int(v) for v in np.unique(truth))
                    shown = _palette_mask(truth) if image is None else overlay(Image.fromarray(image), truth)
                    atomic_write(view / "gt" / f"{stem}.jpg", _thumb(shown, thumb))
                    fg, caption = _foreground(truth)
                    gt_html = (f'<td data-v="{fg}"><img src="{src["gt"]}" alt="ground truth">'
                               f'<span class="note">{caption}</span></td>')
                cams_html: list[str] = []
                cam_file = run / "cams" / f"{stem}.npz"
                if cam_file.is_file() and image is not None:
                    cams = read_cams(cam_file)
                    for j, (c, cam) in enumerate(cams):
                        cam_src = quote(f"cam/{stem}.{j}.jpg")
                        atomic_write(view / "cam" / f"{stem}.{j}.jpg", _thumb(heatmap(image, cam), thumb // 2))
                        label = names[int(c)] if 0 <= int(c) < len(names) else str(c)
                        cams_html.append(f'<figure><img src="{html.escape(cam_src)}" alt="">'
                                         f"<figcaption>{html.escape(label)}</figcaption></figure>")
                swatches = " ".join(
                    f'<span class="swatch" style="background: rgb{tuple(int(x) for x in palette[names.index(lab) + 1])}'
                    f'"></span>{html.escape(lab)}' if lab in names else html.escape(str(lab))
                    for lab in rec.get("labels", []))
                rows.append(
                    f'<tr><td>{html.escape(stem)}</td><td data-v="{iou}">{"" if np.isnan(iou) else f"{100 * iou:.1f}"}'
                    f"</td><td>{swatches}</td><td>{html.escape(str(rec.get('source', '')))}</td>"
                    f"{photo_html}{mask_html}{gt_html}"
                    f'<td data-v="{len(cams_html) if cam_file.is_file() else "NaN"}"><div class="cams">'
                    f'{"".join(cams_html) or "(run with --save-cams)"}</div></td></tr>')
        summary = f"{len(rows)} image(s) from {html.escape(str(source))}"
        if no_photo:
            summary += f"; {no_photo} shown without their photo (moved, changed, or labelled from another folder)"
        if pooled is not None:
            summary += (f". On the {len(ious)} image(s) with ground truth: mIoU {100 * scores(pooled).miou:.2f}% "
                        f"(pixels pooled over all of them, as clipes eval computes it); mean per-image mIoU "
                        f"{100 * float(np.nanmean(ious)):.2f}% (the IoU column: each image's mean over the classes in "
                        "its ground truth, so small images weigh as much as large ones). Sorted by IoU, worst first")
        legend = " ".join(f"<span>{_swatch(palette[v])}{html.escape(_value_name(v, names))}</span>"
                          for v in sorted(used | {0}))
        page = _PAGE.format(title=html.escape(run.name), summary=summary, rows="\n".join(rows), legend=legend,
                            gt_header='<th data-type="num">ground truth</th>' if gt is not None else "",
                            initial_sort='table.querySelectorAll("th")[1].click();' if ious else "")
        atomic_write(view / "index.html", page.encode())
    return run / "view" / "index.html"
