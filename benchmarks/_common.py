"""What the benchmark scripts share: the model/device/dtype options, the name of the hardware, one process per mode."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
# the golden set beside the checkout, or the copy gpu_check.sh carries to a GPU machine
GOLDEN = next((p for p in (_REPO.parent / "shared" / "golden", _REPO / ".golden") if p.is_dir()),
              _REPO.parent / "shared" / "golden")


def parser(doc: str | None, model: str = "ViT-B-16", dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
           ) -> argparse.ArgumentParser:
    """An argument parser with ``--model``, ``--device`` and ``--dtype``; the script's docstring as help."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=model, help=f"default: {model}" + (" (random weights)" * (model == "ViT-B-16")))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=dtypes[0], choices=list(dtypes))
    return ap


def hardware(device: str) -> str:
    """The GPU's name, or the CPU's model name as the kernel reports it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def run_modes(script: str, modes: list[str], json_out: Path | None) -> list[dict]:
    """Run ``script`` once per mode in a fresh process (its own peak memory and warm-up), with this
    command's arguments less ``--json``, and collect the JSON line each child prints last."""
    argv = [a for a in sys.argv[1:] if a != "--json" and (json_out is None or a != str(json_out))]
    rows = []
    for mode in modes:
        done = subprocess.run([sys.executable, script, *argv, "--mode", mode], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {mode} run failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows
