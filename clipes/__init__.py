"""clipes: CLIP-ES pseudo segmentation labels from a frozen CLIP ViT.

>>> from clipes import load_clip, load_class_set, Labeler
>>> labeler = Labeler(load_clip("ViT-B-16/openai"), load_class_set("voc"))  # doctest: +SKIP
>>> result = labeler.label(image, ["cat"])                                  # doctest: +SKIP
>>> result.mask, result.cam_refined                                         # doctest: +SKIP
"""

from .caa import box_mask, refine_cams, sinkhorn_affinity
from .cam import softmax_gradcam
from .errors import ClipesError
from .labeler import Labeler, LabelResult
from .labels import read_labels
from .masks import mask_to_png, overlay, pseudo_mask
from .model import ClipModel, ModelLoadError, load_clip
from .prompts import ClassSet, load_class_set
from .run import LabelConfig, label_folder
from .text import TextFeatures, encode_class_set

__all__ = [
    "ClassSet", "ClipModel", "ClipesError", "LabelConfig", "LabelResult", "Labeler", "ModelLoadError",
    "TextFeatures", "box_mask", "encode_class_set", "label_folder", "load_class_set", "load_clip",
    "mask_to_png", "overlay", "pseudo_mask", "read_labels", "refine_cams", "sinkhorn_affinity",
    "softmax_gradcam",
]
