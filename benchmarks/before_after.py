"""Two checkouts of clipes side by side, interleaved in one run: trunk, whole batch, authors' loop, end to end.

    git worktree add ../clipes-before <commit>
    python benchmarks/before_after.py --before ../clipes-before --json results.json
    python benchmarks/before_after.py --before ../clipes-before --after . --rounds 3 --device cuda

Each measurement runs in its own process with one checkout first on ``PYTHONPATH``, and the
rounds alternate the checkouts (before, after, before, after...), so that a neighbour's work on a
shared machine falls on both alike; the best round of each is kept, every round is in the JSON.
Per checkout and dtype (``--dtypes``; ``default`` is the checkout's own default, ``auto`` on a
checkout that has it): the trunk (``encode_trunk``, blocks 1-11 and the CAA maps) on a batch of
``--batch-size`` images, the whole batch (``Labeler.label_prepared``: trunk, CAM, CAA, masks), and
``clipes label`` end to end on a folder of VOC-sized JPEGs (``label_folder``, as
benchmarks/label_folder.py runs it: a warm-up folder, then the steady rate). The authors' loop is
the ``before`` checkout's reference mode in fp32 (one image at a time, one backward pass per
class, as benchmarks/label_throughput.py runs it). Random ViT-B/16 weights, 513 x 513 images.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

from _common import hardware  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _labeler(clip_spec: str, device: torch.device, dtype: str, **options):
    """A Labeler of whichever checkout is imported, in ``dtype`` as that checkout does it."""
    from clipes import Labeler, load_class_set, load_clip

    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    params = inspect.signature(Labeler).parameters
    torch.manual_seed(0)
    if dtype == "default":
        dtype = "auto" if "autocast" not in params else "float32"
    if dtype == "auto":
        from clipes.precision import resolve_dtype

        dtype = resolve_dtype("auto", device).name
    if "autocast" in params:  # a checkout before issue 22: autocast over fp32 weights
        return Labeler(load_clip(clip_spec, device=device), load_class_set("voc"),
                       autocast=low.get(dtype), **options), dtype
    return Labeler(load_clip(clip_spec, device=device, dtype=low.get(dtype, torch.float32)),
                   load_class_set("voc"), **options), dtype


def child_engine(args: argparse.Namespace) -> dict:
    """Trunk and whole-batch seconds (best of ``--repeat`` after a warm-up), or the reference loop's."""
    from label_throughput import _images

    from clipes.vit import encode_trunk

    device = torch.device(args.device)
    reference = args.what == "reference"
    labeler, dtype = _labeler(args.model, device, "float32" if reference else args.dtype,
                              per_pair_backward=reference)
    images, labels = _images(args.batch_size * (args.repeat + 1), args.size)
    prepared = [labeler.prepare(img, lab) for img, lab in zip(images, labels, strict=True)]
    batch = 1 if reference else args.batch_size
    batches = [prepared[i:i + args.batch_size] for i in range(0, len(prepared), args.batch_size)]
    clip = labeler.clip
    weights_dtype = clip.dtype
    autocast = getattr(labeler, "autocast", None) or (weights_dtype if weights_dtype != torch.float32 else None)

    def trunk(items) -> None:
        x = torch.stack([p.tensor for p in items]).to(device, weights_dtype)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                             enabled=autocast is not None):
            encode_trunk(clip.visual, x, getattr(labeler, "attn_range", labeler.attn_blocks))
        _sync(device)

    def whole(items) -> None:
        for s in range(0, len(items), batch):
            labeler.label_prepared(items[s:s + batch])
        _sync(device)

    out = {"dtype": dtype, "batch_size": batch, "images_per_batch": args.batch_size}
    steps = [("batch_seconds", whole)] + ([] if reference else [("trunk_seconds", trunk)])
    for key, step in steps:
        step(batches[0])  # warm-up
        times = []
        for items in batches[1:]:
            start = time.perf_counter()
            step(items)
            times.append(time.perf_counter() - start)
        out[key] = min(times)
    out["images_per_second"] = args.batch_size / out["batch_seconds"]
    return out


def child_folder(args: argparse.Namespace) -> dict:
    """``clipes label`` end to end: the steady rate between a warm-up folder and the whole one."""
    from label_folder import make_folder

    from clipes.run import LabelConfig, label_folder

    dtype = None if args.dtype in ("default", "auto") else args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds = []
        for name, n in (("warm", args.warmup_images), ("full", args.folder_images)):
            images = make_folder(root / name, n)
            cfg = LabelConfig(images=images, out=root / f"out_{name}", labels=root / name / "labels.json",
                              model=args.model, device=args.device, dtype=dtype, workers=args.workers)
            start = time.perf_counter()
            summary = label_folder(cfg, Console(stderr=True, quiet=True))
            seconds.append(time.perf_counter() - start)
            if summary.failed:
                raise SystemExit(f"{len(summary.failed)} images failed")
        manifest = json.loads((root / "out_full" / "manifest.json").read_text())
    return {"dtype": manifest["settings"]["dtype"], "seconds": seconds[1], "warmup_seconds": seconds[0],
            "images_per_second": (args.folder_images - args.warmup_images) / (seconds[1] - seconds[0])}


def run_child(tree: Path, what: str, dtype: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree.resolve()}{os.pathsep}{_HERE}")
    env.pop("CLIPES_DTYPE", None)
    cmd = [sys.executable, __file__, "--child", what, "--dtype", dtype, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{tree} {what} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=False, help="the checkout to compare against")
    ap.add_argument("--after", type=Path, default=_HERE.parent)
    ap.add_argument("--model", default="ViT-B-16", help="default: ViT-B-16 (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="default,bfloat16", help="comma-separated: default, auto, float32, bfloat16")
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="timed batches per process (after a warm-up batch)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (before, after) of everything")
    ap.add_argument("--folder-images", type=int, default=10)
    ap.add_argument("--warmup-images", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: engine, reference, folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        os.environ.pop("CLIPES_DTYPE", None)
        args.what = args.child
        print(json.dumps(child_folder(args) if args.child == "folder" else child_engine(args)))
        return
    if args.before is None:
        ap.error("--before is required")
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("model", "device", "size", "batch_size", "repeat", "folder_images", "warmup_images", "workers")]
    skip = set(filter(None, args.skip.split(",")))
    jobs = []
    if "reference" not in skip:
        jobs.append(("before", "reference", "float32"))
    for dtype in args.dtypes.split(","):
        for tree in ("before", "after"):
            if "engine" not in skip:
                jobs.append((tree, "engine", dtype))
            if "folder" not in skip:
                jobs.append((tree, "folder", dtype))
    trees = {"before": args.before, "after": args.after}
    rounds: dict[tuple[str, str, str], list[dict]] = {job: [] for job in jobs}
    for r in range(args.rounds):
        for job in jobs:
            tree, what, dtype = job
            res = run_child(trees[tree], what, dtype, passthrough)
            rounds[job].append(res)
            print(f"round {r + 1}: {tree} {what} {dtype}: {res}", file=sys.stderr, flush=True)
    best = {job: max(rs, key=lambda x: x["images_per_second"]) for job, rs in rounds.items()}
    authors = best.get(("before", "reference", "float32"), {}).get("images_per_second")
    machine = hardware(args.device)
    table = Table(title=f"before vs after, interleaved ({args.rounds} rounds, best kept): {args.model} random, "
                        f"{args.size}x{args.size}, batch {args.batch_size}, {machine}, "
                        f"{torch.get_num_threads()} threads; shared machine")
    for col in ("checkout", "part", "asked", "ran", "trunk s/batch", "batch s", "img/s", "x authors' loop"):
        table.add_column(col, justify="right")
    rows = []
    for (tree, what, dtype), res in best.items():
        row = {"checkout": tree, "part": what, "asked": dtype, **res,
               "vs_authors_loop": res["images_per_second"] / authors if authors else None,
               "rounds": rounds[(tree, what, dtype)]}
        rows.append(row)
        table.add_row(tree, what, dtype, res["dtype"], f"{res['trunk_seconds']:.2f}" if "trunk_seconds" in res else "",
                      f"{res['batch_seconds']:.2f}" if "batch_seconds" in res else "",
                      f"{res['images_per_second']:.3f}",
                      f"{row['vs_authors_loop']:.2f}x" if authors else "")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"hardware": machine, "device": args.device, "model": args.model,
                                         "size": args.size, "batch_size": args.batch_size, "rounds": args.rounds,
                                         "threads": torch.get_num_threads(), "before": str(args.before),
                                         "after": str(args.after), "shared_machine": True, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
