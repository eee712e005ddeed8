"""Which floating-point type the vision transformer runs in: the names, and what ``auto`` takes.

``auto`` is the fast one: bf16 on a GPU (the authors ran fp16 there), and on the CPU bf16 only
where this CPU's bf16 matrix products measure faster than its float32 ones (AMX, AVX512-BF16 and
the like; elsewhere bf16 is emulated and slower). The measurement takes a fraction of a second and
is made once per process and dtype; it decides a dtype, which the run records, never a result.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from .defaults import DTYPE_ENV

__all__ = ["DTYPES", "DTYPE_ENV", "DtypeChoice", "cpu_matmul_speedup", "resolve_dtype", "slow_low_precision"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 is taken on the CPU when its products run at least this many times float32's speed: a margin
# over the noise of a short measurement on a busy machine (measured 2 to 5x where bf16 units exist,
# 0.65x on an AVX-512 Xeon without them)
FASTER = 1.2


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run takes, and why, in words (``clipes label`` prints it)."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.nn.functional.linear(a, b)
    return time.perf_counter() - start


@functools.cache
def cpu_matmul_speedup(dtype: torch.dtype, rounds: int = 5) -> float:
    """float32 time over ``dtype`` time of a ViT-B-sized matrix product (512 tokens, 768 -> 768) on this CPU.

    Best of ``rounds`` for each, interleaved, after one warm-up of each, so that a neighbour's
    burst of work on a shared machine slows both alike. Cached per process and dtype.
    """
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(512, 768, generator=gen), torch.randn(768, 768, generator=gen)
    low = a32.to(dtype), b32.to(dtype)
    best32 = best_low = float("inf")
    for i in range(rounds + 1):
        t32, t_low = _seconds(a32, b32), _seconds(*low)
        if i:
            best32, best_low = min(best32, t32), min(best_low, t_low)
    return best32 / best_low


def resolve_dtype(name: str | None, device: torch.device) -> DtypeChoice:
    """The dtype for ``--dtype name`` on ``device``: None reads ``$CLIPES_DTYPE``, else ``auto``, the fast one."""
    name = name or os.environ.get(DTYPE_ENV) or "auto"
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: choose auto or one of {', '.join(DTYPES)}")
        return DtypeChoice(name, "as asked")
    if device.type != "cpu":
        return DtypeChoice("bfloat16", f"auto on {device.type}: bf16 (the authors ran fp16 on GPUs)")
    speedup = cpu_matmul_speedup(torch.bfloat16)
    if speedup >= FASTER:
        return DtypeChoice("bfloat16", f"auto: this CPU's bf16 matrix products measured {speedup:.1f}x float32's")
    return DtypeChoice("float32", f"auto: this CPU's bf16 matrix products measured {speedup:.2f}x float32's, "
                                  "not faster")


def slow_low_precision(choice: DtypeChoice, device: torch.device) -> str | None:
    """A warning when an asked-for low precision measures slower than float32 on this CPU, else None."""
    if device.type != "cpu" or choice.name == "float32":
        return None
    speedup = cpu_matmul_speedup(choice.dtype)
    if speedup >= 1:
        return None
    return (f"--dtype {choice.name}: this CPU's {choice.name} matrix products measured {speedup:.2f}x float32's "
            "speed; float32 (or --dtype auto) will be faster here")
