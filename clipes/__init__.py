"""clipes: CLIP-ES pseudo segmentation labels from a frozen CLIP ViT.

>>> from clipes import load_clip, load_class_set, Labeler
>>> labeler = Labeler(load_clip("ViT-B-16/openai"), load_class_set("voc"))  # doctest: +SKIP
>>> result = labeler.label(image, ["cat"])                                  # doctest: +SKIP
>>> result.mask, result.cam_refined                                         # doctest: +SKIP

The names below load on first use (PEP 562): ``import clipes`` and the command line's ``--help`` do not
pay for torch and open_clip until something needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "box_mask": "caa", "refine_cams": "caa", "sinkhorn_affinity": "caa",
    "softmax_gradcam": "cam",
    "ClipesError": "errors",
    "Labeler": "labeler", "LabelResult": "labeler",
    "read_labels": "labels",
    "mask_to_png": "masks", "overlay": "masks", "pseudo_mask": "masks",
    "ClipModel": "model", "ModelLoadError": "model", "load_clip": "model",
    "ClassSet": "prompts", "load_class_set": "prompts",
    "LabelConfig": "label_plan", "label_folder": "run",
    "TextFeatures": "text", "encode_class_set": "text",
}

__all__ = [
    "ClassSet", "ClipModel", "ClipesError", "LabelConfig", "LabelResult", "Labeler", "ModelLoadError",
    "TextFeatures", "box_mask", "encode_class_set", "label_folder", "load_class_set", "load_clip",
    "mask_to_png", "overlay", "pseudo_mask", "read_labels", "refine_cams", "sinkhorn_affinity",
    "softmax_gradcam",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .caa import box_mask, refine_cams, sinkhorn_affinity
    from .cam import softmax_gradcam
    from .errors import ClipesError
    from .label_plan import LabelConfig
    from .labeler import Labeler, LabelResult
    from .labels import read_labels
    from .masks import mask_to_png, overlay, pseudo_mask
    from .model import ClipModel, ModelLoadError, load_clip
    from .prompts import ClassSet, load_class_set
    from .run import label_folder
    from .text import TextFeatures, encode_class_set
