"""The dense CRF's functions under their first import path; the code lives in ``clipes.refiners.crf``."""

from __future__ import annotations

from .refiners.crf import (
    CrfParams,
    CrfRefiner,
    CrfUnavailableError,
    bilateral_image,
    crf_labels,
    crf_unary,
    dense_crf,
    require_pydensecrf,
)

__all__ = ["CrfParams", "CrfRefiner", "CrfUnavailableError", "bilateral_image", "crf_labels", "crf_unary",
           "dense_crf", "require_pydensecrf"]
