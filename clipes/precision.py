"""Which floating-point type the vision transformer runs in: the names, and what ``auto`` takes.

``auto`` is decided by what the hardware is, never by a timing (a timing on a shared machine follows
the neighbours' load, and two runs of one command could label in different dtypes): bf16 on a GPU
(the authors ran fp16 there); on the CPU bf16 where the CPU has bf16 matrix units (AMX-BF16 or
AVX512-BF16, read from the flags the kernel reports), else float32, as bf16 is emulated and slower
there. Deciding imports no torch. An explicitly asked-for low precision is measured once, only to
warn when it is slower than float32 on this CPU.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import DTYPE_ENV

if TYPE_CHECKING:
    import torch

__all__ = ["BF16_CPU_FLAGS", "DTYPE_ENV", "DTYPE_NAMES", "DtypeChoice", "cpu_bf16_flags", "cpu_matmul_speedup",
           "resolve_dtype", "slow_low_precision", "torch_dtype"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# the CPU flags (Linux /proc/cpuinfo names) of bf16 matrix units: Intel AMX's and AVX-512's bf16 products
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (torch imported here, not when a dtype is chosen)."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run takes, and why, in words (``clipes label`` prints it and records it)."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.name)


def cpu_bf16_flags(cpuinfo: Path = CPUINFO) -> tuple[str, ...]:
    """The bf16 matrix-unit flags (``BF16_CPU_FLAGS``) this CPU reports, () where none or unknown."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break  # every core reports the same
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


@functools.cache
def _this_cpu() -> tuple[str, ...]:
    return cpu_bf16_flags()


def resolve_dtype(name: str | None, device: torch.device | str, flags: tuple[str, ...] | None = None) -> DtypeChoice:
    """The dtype for ``--dtype name`` on ``device``: None reads ``$CLIPES_DTYPE``, else ``auto``.

    ``auto`` on the CPU takes bf16 where ``flags`` (default: this CPU's, ``cpu_bf16_flags``) name a bf16
    matrix unit, else float32: the same answer on every run on one machine.
    """
    name = name or os.environ.get(DTYPE_ENV) or "auto"
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise ValueError(f"--dtype {name!r}: choose auto or one of {', '.join(DTYPE_NAMES)}")
        return DtypeChoice(name, "as asked")
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cpu":
        return DtypeChoice("bfloat16", f"auto on {kind}: bf16 (the authors ran fp16 on GPUs)")
    found = _this_cpu() if flags is None else flags
    if found:
        return DtypeChoice("bfloat16", f"auto: this CPU has bf16 matrix units ({', '.join(found)})")
    return DtypeChoice("float32", f"auto: this CPU has no bf16 matrix unit ({' nor '.join(BF16_CPU_FLAGS)}), "
                                  "where bf16 is emulated and slower")


def _seconds(a, b) -> float:
    import torch

    start = time.perf_counter()
    torch.nn.functional.linear(a, b)
    return time.perf_counter() - start


@functools.cache
def cpu_matmul_speedup(dtype: torch.dtype, rounds: int = 5) -> float:
    """float32 time over ``dtype`` time of a ViT-B-sized matrix product (512 tokens, 768 -> 768) on this CPU.

    Best of ``rounds`` for each, interleaved, after one warm-up of each. Only a warning uses it (see
    ``slow_low_precision``), never a choice. Cached per process and dtype.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(512, 768, generator=gen), torch.randn(768, 768, generator=gen)
    low = a32.to(dtype), b32.to(dtype)
    best32 = best_low = float("inf")
    for i in range(rounds + 1):
        t32, t_low = _seconds(a32, b32), _seconds(*low)
        if i:
            best32, best_low = min(best32, t32), min(best_low, t_low)
    return best32 / best_low


def slow_low_precision(choice: DtypeChoice, device: torch.device | str) -> str | None:
    """A warning when an explicitly asked-for low precision measures slower than float32 on this CPU, else
    None (``auto`` is never measured: it follows the CPU's units)."""
    if getattr(device, "type", str(device)) != "cpu" or choice.name == "float32" or choice.reason != "as asked":
        return None
    speedup = cpu_matmul_speedup(choice.dtype)
    if speedup >= 1:
        return None
    return (f"--dtype {choice.name}: this CPU's {choice.name} matrix products measured {speedup:.2f}x float32's "
            "speed; float32 (or --dtype auto) will be faster here")
