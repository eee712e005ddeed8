"""Shared fixtures: the golden data beside the checkout and small random-weight CLIP models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch

from clipes import Labeler, load_class_set, load_clip
from clipes.precision import DTYPE_ENV

# the suite checks exact results: float32 wherever a test does not ask for a dtype (--dtype auto would
# take bf16 on CPUs with fast bf16 units); the tests of auto clear it
os.environ[DTYPE_ENV] = "float32"

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("CLIPES_GOLDEN", REPO.parent / "shared" / "golden"))
TINY_CKPT = GOLDEN / "tiny-clip-vit-b16-random.pt"


def golden_header() -> str:
    """Where the golden data was looked for, whether it is there, and how to point at it elsewhere."""
    source = "$CLIPES_GOLDEN" if os.environ.get("CLIPES_GOLDEN") else "default ../shared/golden beside the checkout"
    state = "found" if TINY_CKPT.is_file() else "NOT found: the parity and model tests skip"
    return f"clipes golden data: {GOLDEN} ({source}): {state}; set CLIPES_GOLDEN=/path/to/golden to use another copy"


def pytest_report_header(config) -> str:
    return golden_header()


def golden_or_skip() -> Path:
    if not TINY_CKPT.is_file():
        pytest.skip(f"golden data not found at {GOLDEN} (set CLIPES_GOLDEN to its folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_or_skip()


@pytest.fixture(scope="session")
def golden_labels(golden: Path) -> dict[str, list[str]]:
    return json.loads((golden / "labels.json").read_text())


@pytest.fixture(scope="session")
def tiny_clip(golden: Path):
    torch.manual_seed(0)
    return load_clip(str(golden / "tiny-clip-vit-b16-random.pt"))


@pytest.fixture(scope="session")
def voc():
    return load_class_set("voc")


@pytest.fixture(scope="session")
def labeler(tiny_clip, voc) -> Labeler:
    return Labeler(tiny_clip, voc, keep_attention=True)


def make_tiny_openclip(seed: int = 0, patch: int = 16, image: int = 64):
    """A small open_clip CLIP (ViT, 4 blocks, one 64-wide head) with random weights, built in the test.

    Widths are multiples of 64 so that OpenAI-layout inference (heads = width // 64) recovers it.
    """
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=4, width=64, head_width=64, patch_size=patch, image_size=image),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )
    return model.eval()


# a clipes run holding a folder's lock: with "worker", clipes' own lock and a forked DataLoader worker; else
# the same lock taken with the standard library alone (a second or so to start instead of torch's import)
_HOLDER = """
import fcntl, os, sys, time
from pathlib import Path
if sys.argv[2] == "worker":
    from clipes.output import folder_lock
    import torch.utils.data as tud
    class Slow(tud.Dataset):
        def __len__(self): return 1
        def __getitem__(self, i): time.sleep(120); return i
    with folder_lock(Path(sys.argv[1])):
        batches = iter(tud.DataLoader(Slow(), num_workers=1, multiprocessing_context="fork"))
        print(" ".join(str(w.pid) for w in batches._workers), flush=True)
        time.sleep(120)
else:
    path = Path(sys.argv[1]) / ".clipes" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(f"pid {os.getpid()}\\n")
    f.flush()
    print("", flush=True)
    time.sleep(120)
"""


@contextmanager
def lock_held_elsewhere(folder: Path, worker: bool = False) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """Another process holding ``folder``'s writer lock as a running clipes does (with a forked DataLoader
    worker if ``worker``); yields the process and its workers' pids, and kills them all at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), "worker" if worker else "-"],
                            stdout=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        yield proc, workers
    finally:
        for pid in [proc.pid, *workers]:
            with suppress(ProcessLookupError):
                os.kill(pid, 9)
        proc.wait()
        proc.stdout.close()
