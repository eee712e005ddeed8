"""``--tagger global``: CLIP's own image embedding (the CLS token) against every class and background prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import ClipModel
from ..prompts import ClassSet
from ..text import TextFeatures, encode_class_set
from ..vit import cls_embedding, encode_trunk
from .base import Tagger, Tags

__all__ = ["GlobalTagger"]


class GlobalTagger(Tagger):
    """Softmax over the class set's prompts plus its background prompts, on the CLS embedding at the
    image's resolution; a class is present when its score is at least ``threshold``, else the best
    class is taken. ``text`` reuses embeddings the caller already has (the Labeler's)."""

    name = "global"
    source = "zero-shot"

    def __init__(self, clip: ClipModel, class_set: ClassSet, threshold: float = 0.1,
                 text: TextFeatures | None = None) -> None:
        super().__init__(clip, class_set)
        self.threshold = threshold
        self.text = text if text is not None else encode_class_set(clip, class_set)
        self.logit_scale = float(clip.model.logit_scale.exp())

    @classmethod
    def settings(cls, threshold: float = 0.1, **_: Any) -> dict[str, Any]:
        return {"name": cls.name, "threshold": threshold}

    @torch.no_grad()
    def tag(self, images: Tensor, trunk: Tensor | None = None) -> Tags:
        visual = self.clip.visual
        if trunk is None:
            trunk, _ = encode_trunk(visual, images, attn_blocks=1)
        feats = F.normalize(cls_embedding(visual, trunk), dim=-1)
        text = torch.cat([self.text.fg, self.text.bg]).to(feats.dtype)
        probs = (self.logit_scale * feats @ text.T).float().softmax(dim=-1)[:, : len(self.class_set)].cpu()
        picked = []
        for p in probs:
            present = [int(i) for i in torch.nonzero(p >= self.threshold).flatten()]
            picked.append(present or [int(p.argmax())])
        return Tags(scores=probs, labels=picked, thresholds=[self.threshold] * len(picked))
