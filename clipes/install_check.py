"""An installation whose torch and torchvision do not belong together, named in one line with the fix.

pip picks such a pair when the CPU-only index the README names cannot be reached: torchvision's import
then fails deep inside open_clip with ``operator torchvision::nms does not exist``, which names no cause.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

__all__ = ["TORCH_INDEX", "matching_torchvision", "torch_pair_mismatch"]

TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series built for ``torch_version`` (torch 2.N pairs with torchvision 0.N+15)."""
    found = re.match(r"2\.(\d+)", torch_version)
    return None if found is None else f"0.{int(found.group(1)) + 15}"


def torch_pair_mismatch(error: BaseException) -> str | None:
    """One line naming a torch / torchvision mismatch behind ``error`` and the pip command that fixes it, or
    None when ``error`` is something else."""
    text = str(error)
    if "torchvision::" not in text or "does not exist" not in text:
        return None
    torch_v, vision_v = _version("torch") or "?", _version("torchvision") or "?"
    wanted = matching_torchvision(torch_v)
    pin = f"torchvision=={wanted}.*" if wanted else "torchvision"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"torchvision {vision_v} does not match torch {torch_v} ({first}); install the torchvision built for "
            f"this torch: pip install '{pin}' --index-url {TORCH_INDEX} (or the index of your CUDA build)")
