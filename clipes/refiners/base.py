"""The pixel-refiner seam: an image and its refined CAMs in, a label map with an ignore value out.

CLIP-ES refines its CAMs on the patch grid (CAA); a pixel refiner then follows the image's edges
at full resolution to make training labels. Each method is one module of this package, registered
in ``REFINERS`` under its ``--refine`` name. Two kinds:

- ``HostRefiner``: numpy on the host CPU, one image at a time (``refine_image``). It must pickle,
  so that ``clipes label`` can spread it over a process pool while the network runs.
- ``DeviceRefiner``: tensors on the Labeler's device, a batch of images at once (``refine``).

Either kind answers both calls; the other one is derived.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import ClipesError

__all__ = ["DeviceRefiner", "HostRefiner", "Refined", "Refiner", "RefinerError"]


class RefinerError(ClipesError):
    """A refiner cannot be used as asked (unknown name, option of another refiner, bad value)."""


@dataclass
class Refined:
    """One image's refined labels: ``mask`` (H, W) uint8, 0 = background, c + 1 = class c, 255 =
    ignored; ``confidence`` (H, W) float32, the refiner's per-pixel probability, when it has one."""

    mask: Tensor
    confidence: Tensor | None = None


class Refiner(ABC):
    """A training-free pixel-level refiner of CLIP-ES's refined CAMs.

    Inputs, per image: ``image`` (H, W, 3) uint8 RGB (the original pixels), ``cams`` (k, H, W)
    float32 CAA-refined CAMs in [0, 1] at the original size, ``labels`` (k,) the class index of
    each CAM (the order of ``cams``, not sorted), ``bg_power`` t in the background score
    (1 - max cam)^t, for methods that use it. ``name`` is the ``--refine`` value; ``flags`` maps
    each constructor keyword to the ``clipes label`` flag that sets it; ``spelling`` is how the
    CLI asks for this refiner.
    """

    name: ClassVar[str]
    flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def spelling(cls) -> str:
        return f"--refine {cls.name}"

    def check(self) -> None:
        """Raise a ``ClipesError`` when this refiner cannot run here (a missing package); called
        before a run writes anything."""
        return None

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What identifies this refiner's masks (name and parameters), for a run's manifest."""

    @abstractmethod
    def refine(self, images: Sequence[Tensor], cams: Sequence[Tensor], labels: Sequence[Tensor],
               bg_power: float = 1.0) -> list[Refined]:
        """Refine the images of a size group, all tensors on one device; results on that device."""

    @abstractmethod
    def refine_image(self, image: np.ndarray, cams: np.ndarray, labels: np.ndarray,
                     bg_power: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """Refine one image held as numpy arrays: (mask, confidence or None)."""


class HostRefiner(Refiner):
    """A refiner that runs per image on the host CPU (numpy); picklable for a process pool."""

    def refine(self, images: Sequence[Tensor], cams: Sequence[Tensor], labels: Sequence[Tensor],
               bg_power: float = 1.0) -> list[Refined]:
        out = []
        for image, cam, lab in zip(images, cams, labels, strict=True):
            mask, conf = self.refine_image(image.cpu().numpy(), cam.float().cpu().numpy(), lab.cpu().numpy(), bg_power)
            out.append(Refined(torch.from_numpy(mask).to(cam.device),
                               None if conf is None else torch.from_numpy(conf).to(cam.device)))
        return out


class DeviceRefiner(Refiner):
    """A refiner made of tensor operations, run batched on the Labeler's device."""

    def refine_image(self, image: np.ndarray, cams: np.ndarray, labels: np.ndarray,
                     bg_power: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        res = self.refine([torch.tensor(image, dtype=torch.uint8)],
                          [torch.from_numpy(np.asarray(cams, dtype=np.float32))],
                          [torch.as_tensor(np.asarray(labels, dtype=np.int64))], bg_power)[0]
        return res.mask.numpy(), None if res.confidence is None else res.confidence.numpy()
