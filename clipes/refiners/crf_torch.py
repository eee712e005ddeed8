"""CLIP-ES's dense CRF in PyTorch: pydensecrf's model and numbers on the Labeler's device, batched.

Mean-field inference of the fully connected CRF with two Gaussian kernels (Krähenbühl and Koltun
2011) filtered on the permutohedral lattice (``clipes.lattice``), in float32, in the order of
operations of Krähenbühl's code: Q = softmax(-unary); then, ``iterations`` times,
Q = softmax(-unary + w_s * N_s K_s N_s Q + w_a * N_a K_a N_a Q), where K is the lattice filter
(which includes each pixel itself), N = diag(1 / sqrt(K 1)) its symmetric normalisation, w the
Potts weights, s the smoothness kernel (positions / sxy) and a the appearance kernel (positions /
sxy, colours / srgb). Same unary (``crf_unary``, in float16) and bilateral image
(``bilateral_image``) as the pydensecrf backend, computed here with tensor operations.

All images of a batch share one lattice per kernel (each pixel carries its image's index), so a
size group is one set of sorts, sparse products and gathers. No compiler, no extra package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..lattice import Lattice, build_lattice, lattice_filter, padding_points
from ..masks import IGNORE
from ..method_options import CRF_BACKENDS, REFINER_FLAGS
from .base import DeviceRefiner, Refined, Refiner, RefinerError
from .crf import _BGR_MEAN, CrfParams, CrfRefiner, CrfUnavailableError, require_pydensecrf

__all__ = ["CRF_BACKENDS", "CrfTorchRefiner", "bilateral_image_torch", "crf_unary_torch", "default_crf_backend",
           "dense_crf_torch", "kernel_features", "mean_field", "with_crf_backend"]


# pixels per lattice: bounds the working memory (about 1 KB a pixel) of one batch
MAX_PIXELS = 2**22


def bilateral_image_torch(rgb: Tensor) -> Tensor:
    """``bilateral_image`` on a (H, W, 3) uint8 tensor: BGR minus the Caffe means, wrapped to uint8."""
    mean = torch.tensor(_BGR_MEAN, dtype=torch.float32, device=rgb.device)
    bgr = rgb.flip(-1).float() - mean
    return torch.remainder(torch.trunc(bgr).long(), 256).to(torch.uint8)


def crf_unary_torch(cams: Tensor, bg_power: float = 1.0) -> Tensor:
    """``crf_unary`` on a (k, H, W) tensor: -log of [background, cams] in float16, as (H*W, k + 1) float32."""
    h, w = cams.shape[-2:]
    cams16 = cams.to(torch.float16)

    def half(x: float) -> Tensor:
        return torch.tensor(x, dtype=torch.float16, device=cams.device)

    if len(cams16):
        bg = torch.pow(1 - cams16.amax(0, keepdim=True), half(bg_power))
    else:
        bg = torch.ones(1, h, w, dtype=torch.float16, device=cams.device)
    probs = torch.cat([bg, cams16]).clamp(half(1e-5), half(1.0))
    return (-torch.log(probs)).float().reshape(len(probs), -1).T


def _divide(x: Tensor, s: float) -> Tensor:
    """``x / s`` as a true division on every device (CUDA multiplies by 1/s when s is a scalar)."""
    return x / torch.full_like(x, s)


def kernel_features(rgb: Tensor, sxy: float, srgb: float | None = None) -> Tensor:
    """(H*W, 2) positions / sxy, or (H*W, 5) with the bilateral image's channels / srgb: pydensecrf's features."""
    h, w = rgb.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, device=rgb.device, dtype=torch.float32),
                            torch.arange(w, device=rgb.device, dtype=torch.float32), indexing="ij")
    feats = [_divide(xs.reshape(-1), sxy), _divide(ys.reshape(-1), sxy)]
    if srgb is not None:
        colour = bilateral_image_torch(rgb).reshape(-1, 3).float()
        feats += [_divide(colour[:, c], srgb) for c in range(3)]
    return torch.stack(feats, 1)


def _softmax(logits: Tensor) -> Tensor:
    """Krähenbühl's expAndNormalize over channels: exp(x - max) / sum, summed channel by channel."""
    e = torch.exp(logits - logits.amax(1, keepdim=True))
    total = e[:, 0].clone()
    for c in range(1, e.shape[1]):
        total = total + e[:, c]
    return e / total[:, None]


def _normaliser(lattice: Lattice, n: int, device: torch.device) -> Tensor:
    """NORMALIZE_SYMMETRIC's 1 / sqrt(K 1 + 1e-20) per pixel (computed in float64, as the reference does)."""
    norm = lattice_filter(lattice, torch.ones(n, 1, device=device))[:, 0]
    return (1.0 / torch.sqrt(norm.double() + 1e-20)).float()[:, None]


def mean_field(unary: Tensor, kernels: Sequence[tuple[Lattice, float]], iterations: int) -> Tensor:
    """Mean-field marginals (N, C) from a unary (N, C) and Potts kernels (lattice, weight), in that order.

    A channel whose unary is +inf keeps probability 0 (used to pad images with fewer classes).
    """
    n = unary.shape[0]
    norms = [_normaliser(lat, n, unary.device) for lat, _ in kernels]
    neg = -unary
    q = _softmax(neg)
    for _ in range(iterations):
        logits = neg
        for (lat, weight), norm in zip(kernels, norms, strict=True):
            logits = logits + weight * (lattice_filter(lat, q * norm) * norm)
        q = _softmax(logits)
    return q


def dense_crf_torch(images: Sequence[Tensor], unaries: Sequence[Tensor],
                    params: CrfParams | None = None) -> list[Tensor]:
    """Marginals of the dense CRF for a batch: (H, W, 3) uint8 images, (H*W, C_i) unaries -> (C_i, H, W) each."""
    params = params or CrfParams()
    if not images:
        return []
    device = unaries[0].device
    sizes = [int(u.shape[0]) for u in unaries]
    channels = max(int(u.shape[1]) for u in unaries)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    unary = torch.cat([torch.nn.functional.pad(u.float(), (0, channels - u.shape[1]), value=float("inf"))
                       for u in unaries])
    def lattice(feats: list[Tensor]) -> Lattice:
        # pydensecrf's SSE lattice adds zero-feature points to an image of H*W % 4 != 0 (``padding_points``)
        extra = [padding_points(len(f), f.shape[1], device) for f in feats]
        extra_owner = torch.repeat_interleave(torch.arange(len(feats), device=device),
                                              torch.tensor([len(e) for e in extra], device=device))
        return build_lattice(torch.cat(feats), owner, extra=torch.cat(extra), extra_image=extra_owner)

    smooth = lattice([kernel_features(im, params.gaussian_sxy) for im in images])
    appearance = lattice([kernel_features(im, params.bilateral_sxy, params.bilateral_srgb) for im in images])
    q = mean_field(unary, [(smooth, float(params.gaussian_compat)), (appearance, float(params.bilateral_compat))],
                   params.iterations)
    out = []
    for im, u, part in zip(images, unaries, torch.split(q, sizes), strict=True):
        out.append(part[:, :u.shape[1]].T.reshape(u.shape[1], *im.shape[:2]))
    return out


def _batches(images: Sequence[Tensor], channels: Sequence[int], budget: int) -> list[list[int]]:
    """Groups of image indices to filter together, each at most ``budget`` pixels (an image alone may exceed it).

    Images with one or two channels (background and at most one class) go apart from the others:
    the reference slices those in another order, which padding would change.
    """
    groups: list[list[int]] = []
    for few in (True, False):
        used = budget
        for i, im in enumerate(images):
            if (channels[i] <= 2) != few:
                continue
            pixels = im.shape[0] * im.shape[1]
            if used + pixels > budget:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += pixels
    return groups


class CrfTorchRefiner(DeviceRefiner):
    """CLIP-ES's dense CRF in PyTorch on the Labeler's device: pydensecrf's labels, batched.

    ``confidence``: pixels whose CRF probability is below it become 255 (CLIP-ES: 0.95).
    ``max_pixels`` bounds the pixels filtered at once (memory: about 1 KB a pixel).
    """

    name = "crf"
    flags: ClassVar[dict[str, str]] = REFINER_FLAGS["crf"]

    def __init__(self, confidence: float | None = None, params: CrfParams | None = None,
                 max_pixels: int = MAX_PIXELS) -> None:
        if confidence is not None and not 0 < confidence <= 1:
            raise RefinerError(f"--confidence {confidence}: must be in (0, 1]")
        self.confidence = confidence
        self.params = params or CrfParams()
        self.max_pixels = max_pixels

    @classmethod
    def spelling(cls) -> str:
        return "--crf"

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "backend": "torch", "confidence": self.confidence, **asdict(self.params)}

    def refine(self, images: Sequence[Tensor], cams: Sequence[Tensor], labels: Sequence[Tensor],
               bg_power: float = 1.0) -> list[Refined]:
        for image, cam, lab in zip(images, cams, labels, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
                raise RefinerError(f"the CRF needs (H, W, 3) uint8 images, not {tuple(image.shape)} {image.dtype}")
            if cam.ndim != 3 or cam.shape[1:] != image.shape[:2] or len(lab) != len(cam):
                raise RefinerError(f"CAMs {tuple(cam.shape)} and {len(lab)} label(s) do not match the image "
                                   f"{tuple(image.shape[:2])}")
        out: dict[int, Refined] = {}
        for group in _batches(images, [len(c) + 1 for c in cams], self.max_pixels):
            marginals = dense_crf_torch([images[i] for i in group],
                                        [crf_unary_torch(cams[i], bg_power) for i in group], self.params)
            for i, q in zip(group, marginals, strict=True):
                keys = torch.cat([torch.zeros(1, dtype=torch.int64, device=q.device),
                                  labels[i].long().to(q.device) + 1])
                conf, best = q.max(0)
                mask = keys[best].to(torch.uint8)
                if self.confidence is not None:
                    mask[conf < self.confidence] = IGNORE
                out[i] = Refined(mask, conf)
        return [out[i] for i in range(len(images))]


def default_crf_backend(device: torch.device) -> str:
    """torch on a GPU; on the CPU pydensecrf (faster there, see benchmarks/crf_backends.py) when installed."""
    if device.type != "cpu":
        return "torch"
    try:
        require_pydensecrf()
    except CrfUnavailableError:
        return "torch"
    return "pydensecrf"


def with_crf_backend(refiner: Refiner | None, backend: str | None, device: torch.device) -> Refiner | None:
    """``refiner`` with ``--crf-backend`` applied: the dense CRF on ``backend`` (None: the default for ``device``).

    A backend without the CRF is refused, naming the flags.
    """
    if backend is not None and backend not in CRF_BACKENDS:
        raise RefinerError(f"--crf-backend {backend!r}: choose one of {', '.join(CRF_BACKENDS)}")
    if not isinstance(refiner, CrfRefiner):
        if backend is not None:
            raise RefinerError("--crf-backend needs --crf (or --refine crf)")
        return refiner
    if (backend or default_crf_backend(device)) == "torch":
        return CrfTorchRefiner(refiner.confidence, refiner.params)
    return refiner
