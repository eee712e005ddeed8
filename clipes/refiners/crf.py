"""The dense CRF as the reference runs it (pydensecrf), behind the pixel-refiner seam.

Optional: ``pip install 'clipes[crf]'`` brings ``pydensecrf2``, a maintained build of Krähenbühl's
fully-connected CRF (``pydensecrf`` API). The unary and the bilateral image are CLIP-ES's; another
CRF backend (e.g. on the GPU) reuses ``CrfParams``, ``crf_unary`` and ``bilateral_image``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ClipesError
from ..masks import IGNORE
from ..method_options import REFINER_FLAGS
from .base import HostRefiner, RefinerError

__all__ = ["CrfParams", "CrfRefiner", "CrfUnavailableError", "bilateral_image", "crf_labels", "crf_unary",
           "dense_crf", "require_pydensecrf"]

# Caffe's BGR means that the reference subtracts before casting the bilateral image to uint8.
_BGR_MEAN = (104.008, 116.669, 122.675)


class CrfUnavailableError(ClipesError):
    """--crf was asked for but pydensecrf is not installed."""


@dataclass(frozen=True)
class CrfParams:
    """The reference's settings (CLIP-ES, 75.0 mIoU on VOC train)."""

    iterations: int = 10
    gaussian_sxy: float = 1
    gaussian_compat: float = 3
    bilateral_sxy: float = 67
    bilateral_srgb: float = 3
    bilateral_compat: float = 4


def bilateral_image(rgb: np.ndarray) -> np.ndarray:
    """The colour image the reference gives the bilateral term: BGR minus the Caffe means, as uint8.

    The reference casts negative floats to uint8, which wraps around on x86 (truncate, then modulo
    256); this does the same explicitly.
    """
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(_BGR_MEAN, dtype=np.float32)
    return np.ascontiguousarray(np.mod(np.trunc(bgr).astype(np.int64), 256).astype(np.uint8))


def crf_unary(cams: np.ndarray, bg_power: float = 1.0) -> np.ndarray:
    """-log of [background, cams] computed in float16 as the reference stores its CAMs: (C + 1, H*W)."""
    cams16 = np.asarray(cams, dtype=np.float16)
    bg = np.power(1 - np.max(cams16, axis=0, keepdims=True), np.float16(bg_power)) if len(cams16) else \
        np.ones((1, *cams16.shape[1:]), dtype=np.float16)
    probs = np.concatenate([bg, cams16], axis=0)
    probs = np.clip(probs, np.float16(1e-5), np.float16(1.0))
    return np.ascontiguousarray((-np.log(probs)).reshape(probs.shape[0], -1).astype(np.float32))


def require_pydensecrf():
    """The ``pydensecrf.densecrf`` module, or a clear error naming the extra to install."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise CrfUnavailableError("--crf needs pydensecrf: pip install 'clipes[crf]' (the pydensecrf2 package)") from e
    return dcrf


def dense_crf(rgb: np.ndarray, unary: np.ndarray, params: CrfParams | None = None) -> np.ndarray:
    """Mean-field inference of the dense CRF: (H, W, 3) uint8 image, (C, H*W) unary -> (C, H, W) marginals."""
    dcrf = require_pydensecrf()
    params = params or CrfParams()
    h, w = rgb.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=bilateral_image(rgb),
                             compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(unary.shape[0], h, w)


def crf_labels(rgb: np.ndarray, cams: np.ndarray, labels: np.ndarray, bg_power: float = 1.0,
               confidence: float | None = None, params: CrfParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CRF-refined label map (0 = background, c + 1 = class c) and the per-pixel CRF confidence.

    With ``confidence``, pixels whose CRF probability is below it are set to 255 (ignored by the
    confidence-guided loss).
    """
    q = dense_crf(rgb, crf_unary(cams, bg_power), params)
    keys = np.concatenate([[0], np.asarray(labels, dtype=np.int64) + 1])
    mask = keys[np.argmax(q, axis=0)].astype(np.uint8)
    conf = np.max(q, axis=0)
    if confidence is not None:
        mask[conf < confidence] = IGNORE
    return mask, conf


class CrfRefiner(HostRefiner):
    """CLIP-ES's dense CRF on the host CPU: the label map and the CRF's probability per pixel.

    ``confidence``: pixels whose CRF probability is below it become 255 (CLIP-ES: 0.95), the
    pixels the confidence-guided loss of ``train-seg`` ignores.
    """

    name = "crf"
    flags: ClassVar[dict[str, str]] = REFINER_FLAGS["crf"]

    def __init__(self, confidence: float | None = None, params: CrfParams | None = None) -> None:
        if confidence is not None and not 0 < confidence <= 1:
            raise RefinerError(f"--confidence {confidence}: must be in (0, 1]")
        self.confidence = confidence
        self.params = params or CrfParams()

    @classmethod
    def spelling(cls) -> str:
        return "--crf"

    def check(self) -> None:
        require_pydensecrf()

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "backend": "pydensecrf", "confidence": self.confidence, **asdict(self.params)}

    def refine_image(self, image: np.ndarray, cams: np.ndarray, labels: np.ndarray,
                     bg_power: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        return crf_labels(image, cams, labels, bg_power, self.confidence, self.params)
