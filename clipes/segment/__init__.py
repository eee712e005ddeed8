"""The final segmenter of CLIP-ES: encoders, heads and the registry composing them, training with the
confidence-guided loss, inference.

``SEGMENTERS`` and ``build_segmenter`` load torch on first use: ``clipes.segment.presets`` is read without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEGMENTERS", "build_segmenter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
