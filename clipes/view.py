"""A static HTML page to look through a labelling run: image, mask overlay, CAMs, per-image IoU."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from .errors import ClipesError
from .evaluate import confusion, scores
from .images import ImageError, read_image
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
.cams figure {{ margin: 0; }} figcaption {{ font-size: 12px; }}
.swatch {{ display: inline-block; width: 10px; height: 10px; margin-right: 3px; }}
</style></head><body>
<h1>{title}</h1><p>{summary}</p>
<table id="runs"><thead><tr>
<th data-type="text">image</th><th data-type="num">IoU</th><th data-type="text">labels</th>
<th data-type="text">source</th><th>photo</th><th>pseudo mask</th><th>CAMs (refined)</th>
</tr></thead><tbody>
{rows}
</tbody></table>
<script>
const table = document.getElementById("runs");
table.querySelectorAll("th[data-type]").forEach((th, col) => th.addEventListener("click", () => {{
  const body = table.tBodies[0], rows = Array.from(body.rows);
  const desc = th.classList.contains("sorted") && !th.classList.contains("desc");
  const key = r => th.dataset.type === "num" ? parseFloat(r.cells[col].dataset.v) : r.cells[col].innerText;
  rows.sort((a, b) => {{ const x = key(a), y = key(b);
    const c = th.dataset.type === "num" ? ((isNaN(x) ? 1e9 : x) - (isNaN(y) ? 1e9 : y)) : x.localeCompare(y);
    return desc ? -c : c; }});
  table.querySelectorAll("th").forEach(h => h.classList.remove("sorted", "desc"));
  th.classList.add("sorted"); if (desc) th.classList.add("desc");
  rows.forEach(r => body.appendChild(r));
}}));
{initial_sort}
</script></body></html>
"""


def build_view(run: Path, gt=None, limit: int | None = None, thumb: int = 320) -> Path:
    """Write ``run/view/index.html`` with thumbnails; rows sortable, worst IoU first when ``gt`` is given."""
    manifest_path, labels_path = run / "manifest.json", run / "labels.json"
    if not manifest_path.is_file() or not labels_path.is_file():
        raise ClipesError(f"{run} is not a clipes output folder (no manifest.json / labels.json)")
    manifest = json.loads(manifest_path.read_text())
    records = json.loads(labels_path.read_text())
    source = Path(manifest.get("input", ""))
    names = manifest.get("settings", {}).get("classes", {}).get("classes", [])
    palette = voc_palette()
    view = run / "view"
    rows, ious = [], []
    stems = sorted(records)[:limit] if limit else sorted(records)
    with Progress(transient=True) as progress:
        for stem in progress.track(stems, description="building view"):
            rec = records[stem]
            mask_path = run / "masks" / f"{stem}.png"
            image_path = source / rec["file"] if "file" in rec else None
            if not mask_path.is_file() or image_path is None or not image_path.is_file():
                continue
            try:
                image = np.asarray(read_image(image_path, manifest.get("settings", {}).get("exif_transpose", True))
                                   .convert("RGB"))
            except ImageError:
                continue
            mask = np.asarray(Image.open(mask_path))
            iou = float("nan")
            if gt is not None and stem in gt:
                n = len(names) + 1
                iou = scores(confusion(mask, gt.mask(stem), n)).miou
                ious.append(iou)
            safe = stem.replace("/", "__")
            atomic_write(view / "img" / f"{safe}.jpg", _thumb(image, thumb))
            atomic_write(view / "img" / f"{safe}.mask.jpg", _thumb(overlay(Image.fromarray(image), mask), thumb))
            cams_html = []
            cam_file = run / "cams" / f"{stem}.npz"
            if cam_file.is_file():
                with np.load(cam_file) as data:
                    for j, (c, cam) in enumerate(zip(data["labels"], data["cam_refined"], strict=True)):
                        atomic_write(view / "img" / f"{safe}.cam{j}.jpg", _thumb(heatmap(image, cam), thumb // 2))
                        cams_html.append(f'<figure><img src="img/{html.escape(safe)}.cam{j}.jpg" alt="">'
                                         f"<figcaption>{html.escape(names[int(c)] if names else str(c))}"
                                         "</figcaption></figure>")
            swatches = " ".join(
                f'<span class="swatch" style="background: rgb{tuple(int(x) for x in palette[names.index(lab) + 1])}">'
                f"</span>{html.escape(lab)}" if lab in names else html.escape(lab) for lab in rec["labels"])
            rows.append(
                f'<tr><td>{html.escape(stem)}</td><td data-v="{iou}">{"" if np.isnan(iou) else f"{100 * iou:.1f}"}'
                f"</td><td>{swatches}</td><td>{html.escape(rec.get('source', ''))}</td>"
                f'<td><img src="img/{html.escape(safe)}.jpg" alt=""></td>'
                f'<td><img src="img/{html.escape(safe)}.mask.jpg" alt=""></td>'
                f'<td><div class="cams">{"".join(cams_html) or "(run with --save-cams)"}</div></td></tr>')
    summary = f"{len(rows)} image(s) from {html.escape(str(source))}"
    if ious:
        summary += f"; mean per-image mIoU {100 * float(np.nanmean(ious)):.1f} (click IoU to sort, worst first)"
    page = _PAGE.format(title=html.escape(run.name), summary=summary, rows="\n".join(rows),
                        initial_sort='table.querySelectorAll("th")[1].click();' if ious else "")
    atomic_write(view / "index.html", page.encode())
    return view / "index.html"
