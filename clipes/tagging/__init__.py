"""Taggers: which classes of a class set an image holds, when no image-level labels are given.

``TAGGERS`` maps each ``--tagger`` name to its class; ``make_tagger`` builds one and
``tagger_settings`` describes one for a run's manifest without loading anything.
"""

from __future__ import annotations

from typing import Any

from ..model import ClipModel
from ..prompts import ClassSet
from .base import Tagger, TaggerError, Tags
from .global_cls import GlobalTagger
from .tagclip import TagCLIP

__all__ = ["TAGGERS", "GlobalTagger", "TagCLIP", "Tagger", "TaggerError", "Tags", "make_tagger", "tagger_class",
           "tagger_settings"]

TAGGERS: dict[str, type[Tagger]] = {"tagclip": TagCLIP, "global": GlobalTagger}


def tagger_class(name: str) -> type[Tagger]:
    """The tagger registered as ``name``; a ``TaggerError`` listing the known ones otherwise."""
    try:
        return TAGGERS[name]
    except KeyError:
        raise TaggerError(f"--tagger {name!r}: choose one of {', '.join(TAGGERS)}") from None


def tagger_settings(name: str, class_set: ClassSet, zero_shot_threshold: float = 0.1) -> dict[str, Any]:
    """A tagger's name and threshold, after checking that it can tag with ``class_set``."""
    cls = tagger_class(name)
    cls.check_class_set(class_set)
    return cls.settings(threshold=zero_shot_threshold)


def make_tagger(name: str, clip: ClipModel, class_set: ClassSet, zero_shot_threshold: float = 0.1,
                **options: Any) -> Tagger:
    """Build the tagger ``name``; ``zero_shot_threshold`` is the global tagger's threshold."""
    cls = tagger_class(name)
    if cls is GlobalTagger:
        return GlobalTagger(clip, class_set, threshold=zero_shot_threshold, **options)
    return cls(clip, class_set, **options)
