"""Batches that shrink when memory runs out: the rule every batched command follows, on a GPU or a CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

__all__ = ["HalvingBatches", "is_out_of_memory"]

T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a RuntimeError, or Python's MemoryError)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


class HalvingBatches(Generic[T, R]):
    """Runs ``fn`` (a list of items -> one result each) over chunks of at most ``batch_size`` items.

    After an out-of-memory error the batch size is halved for good and the chunk retried; an item
    that does not fit even alone gets, in place of its result, the reason as a string (naming its
    ``input_size``), so the caller reports it and goes on.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], batch_size: int,
                 input_size: Callable[[T], tuple[int, int]]) -> None:
        self.fn = fn
        self.batch_size = batch_size
        self.input_size = input_size

    def __call__(self, items: Sequence[T]) -> list[R | str]:
        out: list[R | str] = []
        start = 0
        while start < len(items):
            chunk = list(items[start:start + self.batch_size])
            try:
                out += self.fn(chunk)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    h, w = self.input_size(chunk[0])
                    out.append(f"out of memory at input size {h}x{w}; lower --max-side")
                    start += 1
                else:
                    self.batch_size = max(1, len(chunk) // 2)
                continue
            start += len(chunk)
        return out
