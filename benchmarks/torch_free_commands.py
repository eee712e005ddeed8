"""Wall and CPU seconds of the commands that run no model, and of `clipes label` mistakes, per checkout.

Each command runs in a fresh process (``python -m clipes``), whose own CPU time (user + system, from
``resource.getrusage``) is the figure that load on a shared machine changes least; whether it imported torch
is printed beside it. Give two checkouts to compare them in one run (interleaved, so both see one load):

    python benchmarks/torch_free_commands.py --repo ../main --repo .
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CLIPES_GOLDEN", _REPO.parent / "shared" / "golden"))
_PROBE = ("import sys, runpy\nsys.argv = ['clipes', *sys.argv[1:]]\ntry:\n    runpy.run_module('clipes', "
          "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules, file=sys.stderr)")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(repo: Path, args: list[str], cwd: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo), "CLIPES_DTYPE": "float32"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "torch": "TORCH True" in res.stderr}


def make_run(work: Path) -> tuple[Path, Path, Path]:
    """A two-image run labelled with the tiny random checkpoint (with torch, by the checkout given first)."""
    from PIL import Image

    photos, labels = work / "photos", work / "labels.json"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        Image.open(GOLDEN / "images" / f"{name}.png").resize((96, 64)).save(photos / f"{name}.png")
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    return photos, labels, work / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", type=Path, help="a checkout (repeat to compare); default: this one")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()
    repos = [r.resolve() for r in (a.repo or [_REPO])]
    work = Path(tempfile.mkdtemp(prefix="clipes-torch-free-"))
    try:
        photos, labels, out = make_run(work)
        ckpt = str(GOLDEN / "tiny-clip-vit-b16-random.pt")
        label = ["label", str(photos), "--labels", str(labels), "--model", ckpt, "--device", "cpu"]
        made = subprocess.run([sys.executable, "-m", "clipes", *label, "--out", str(out)], cwd=work,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repos[0]),
                                                                   "CLIPES_DTYPE": "float32"})
        assert made.returncode == 0, made.stderr
        cases = {
            "prompts show": ["prompts", "show"],
            "eval": ["eval", str(out), str(out / "masks"), "--json", str(work / "e.json")],
            "view": ["view", str(out)],
            "export coco": ["export", str(out), "-f", "coco", "-o", str(work / "c.json")],
            "export cvat": ["export", str(out), "-f", "cvat", "-o", str(work / "c.zip")],
            "label --refine crf --par-bg-high 0.6": [*label, "--out", str(work / "x"), "--refine", "crf",
                                                     "--par-bg-high", "0.6"],
            "label --model /nonexistent.pt": ["label", str(photos), "--model", "/nonexistent.pt", "--out",
                                              str(work / "x")],
            "label --out inside the images": [*label, "--out", str(photos / "out")],
            "label, a refused resume": [*label, "--out", str(out), "--bg-power", "2"],
            "label, nothing to do": [*label, "--out", str(out)],
        }
        print(f"CPU: {cpu_name()} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
        figures: dict[str, dict[str, dict]] = {}
        for name, args in cases.items():
            row = figures.setdefault(name, {})
            for repo in repos:  # interleaved: the checkouts share each moment's load
                row[str(repo)] = run(repo, args, work)
            print(f"{name:40s} " + "   ".join(f"{Path(r).name}: wall {v['wall_s']:5.2f}s cpu {v['cpu_s']:5.2f}s "
                                               f"torch={'yes' if v['torch'] else 'no'}" for r, v in row.items()))
        if a.json:
            a.json.write_text(json.dumps({"cpu": cpu_name(), "figures": figures}, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
