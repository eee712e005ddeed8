"""Test-time dense CRF on a segmenter's probabilities, as deeplab-pytorch's ``main.py crf`` runs it.

Its settings (``configs/voc12.yaml`` CRF: 10 iterations, Gaussian sxy 1 / weight 3, bilateral sxy 67 / srgb 3 /
weight 4) are CLIP-ES's pseudo-label CRF's; its unary is ``pydensecrf.utils.unary_from_softmax``: -log of the
softmax clipped to [1e-5, 1], in float32, and its bilateral image is the dataset's mean-subtracted BGR image cast
to uint8 (``refiners.crf.bilateral_image``). Both backends of ``clipes label --crf`` run it: pydensecrf on the
host, or the PyTorch mean field (``refiners.crf_torch``) on any device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..refiners.crf import CrfParams, dense_crf
from ..refiners.crf_torch import CRF_BACKENDS, default_crf_backend, dense_crf_torch

__all__ = ["DEEPLAB_CRF", "crf_probabilities", "resolve_crf_backend", "softmax_unary"]

DEEPLAB_CRF = CrfParams(iterations=10, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                        bilateral_compat=4)
CLIP = 1e-5  # unary_from_softmax's default clip


def softmax_unary(probs: Tensor) -> Tensor:
    """(C, H, W) probabilities -> (C, H*W) float32 unary: -log(clip(p, 1e-5, 1))."""
    return -torch.log(probs.float().clamp(CLIP, 1.0)).reshape(probs.shape[0], -1)


def resolve_crf_backend(backend: str | None, device: torch.device) -> str:
    """``--crf-backend`` or the default for the device (torch on a GPU; pydensecrf on the CPU when installed)."""
    from ..errors import ClipesError

    if backend is not None and backend not in CRF_BACKENDS:
        raise ClipesError(f"--crf-backend {backend!r}: choose one of {', '.join(CRF_BACKENDS)}")
    return backend or default_crf_backend(device)


def crf_probabilities(rgb: np.ndarray, probs: Tensor, backend: str, params: CrfParams = DEEPLAB_CRF) -> Tensor:
    """The CRF's marginals (C, H, W) for an (H, W, 3) uint8 RGB image and the segmenter's (C, H, W) softmax."""
    unary = softmax_unary(probs)
    if backend == "pydensecrf":
        q = dense_crf(np.ascontiguousarray(rgb), unary.cpu().numpy(), params)
        return torch.from_numpy(q).to(probs.device)
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(probs.device)  # a writable copy
    return dense_crf_torch([image], [unary.T.contiguous()], params)[0]
