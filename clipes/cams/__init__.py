"""CAM methods: how CLIP-ES's class maps are made before CAA refines them.

``CAMS`` maps each ``--cam`` name to its class; ``make_cam`` builds one from the options that are set
and refuses an option that belongs to another method. A new method is a module with a ``CamMethod``
subclass and one line in ``CAMS``. The dense methods (``DenseCam``: MaskCLIP, SCLIP, ClearCLIP,
NACLIP) make their masks themselves, as their authors do, instead of CLIP-ES's class maps.
"""

from __future__ import annotations

from typing import Any

from .base import CamError, CamMaps, CamMethod
from .dense import ClearClip, DenseCam, MaskClip, Naclip, Sclip
from .getam import Getam, getam_maps, normalize_by_max
from .gradcam import GradCam

__all__ = ["CAMS", "CamError", "CamMaps", "CamMethod", "ClearClip", "DenseCam", "Getam", "GradCam", "MaskClip",
           "Naclip", "Sclip", "cam_class", "getam_maps", "make_cam", "normalize_by_max"]

# gradient CAMs for CLIP-ES's pipeline, then the forward-only dense methods (their own masks, ``DenseCam``)
CAMS: dict[str, type[CamMethod]] = {"gradcam": GradCam, "getam": Getam, "maskclip": MaskClip, "sclip": Sclip,
                                    "clearclip": ClearClip, "naclip": Naclip}


def cam_class(name: str) -> type[CamMethod]:
    """The CAM method registered as ``name``; a ``CamError`` listing the known ones otherwise."""
    try:
        return CAMS[name]
    except KeyError:
        raise CamError(f"--cam {name!r}: choose one of {', '.join(CAMS)}") from None


def make_cam(name: str, per_pair: bool = False, **options: Any) -> CamMethod:
    """CAM method ``name`` built from the ``options`` that are not None (constructor keywords of the
    registered methods); one that ``name`` does not take is an error naming its flag and its method."""
    cls = cam_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given.keys() - cls.flags.keys():
        owner = next((c for c in CAMS.values() if key in c.flags), None)
        if owner is None:
            raise TypeError(f"no CAM method takes the option {key!r}")
        if issubclass(owner, DenseCam):
            dense = "|".join(n for n, c in CAMS.items() if issubclass(c, DenseCam))
            raise CamError(f"{owner.flags[key]} needs a dense method (--cam {dense}), not {cls.spelling()}")
        raise CamError(f"{owner.flags[key]} needs {owner.spelling()}, not {cls.spelling()}")
    return cls(per_pair=per_pair, **given)
