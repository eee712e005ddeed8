"""Pixel refiners: CLIP-ES's refined CAMs -> label maps along image edges, with an ignore value.

``REFINERS`` maps each ``--refine`` name to its class; ``make_refiner`` builds one from the options
that are set and refuses an option that belongs to another refiner. A new refiner is a module
with a ``HostRefiner`` or ``DeviceRefiner`` subclass and one line in ``REFINERS``.
"""

from __future__ import annotations

from typing import Any

from .base import DeviceRefiner, HostRefiner, Refined, Refiner, RefinerError
from .crf import CrfRefiner
from .pamr import PamrRefiner
from .par import ParRefiner

__all__ = ["REFINERS", "CrfRefiner", "DeviceRefiner", "HostRefiner", "PamrRefiner", "ParRefiner", "Refined", "Refiner",
           "RefinerError", "make_refiner", "refiner_class"]

REFINERS: dict[str, type[Refiner]] = {"crf": CrfRefiner, "par": ParRefiner, "pamr": PamrRefiner}


def refiner_class(name: str) -> type[Refiner]:
    """The refiner registered as ``name``; a ``RefinerError`` listing the known ones otherwise."""
    try:
        return REFINERS[name]
    except KeyError:
        raise RefinerError(f"--refine {name!r}: choose one of {', '.join(REFINERS)} or none") from None


def _owner(option: str) -> type[Refiner]:
    return next(cls for cls in REFINERS.values() if option in cls.flags)


def make_refiner(name: str | None, **options: Any) -> Refiner | None:
    """Refiner ``name`` (None or ``none``: no refiner) built from the ``options`` that are not None.

    Options are the constructor keywords of the registered refiners; one given to a refiner that
    does not take it is an error naming its flag and the refiner it belongs to.
    """
    cls = None if name in (None, "none") else refiner_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if cls is not None and key in cls.flags:
            continue
        if not any(key in c.flags for c in REFINERS.values()):
            raise TypeError(f"no refiner takes the option {key!r}")
        owner = _owner(key)
        why = "" if cls is None else f", not --refine {name}"
        raise RefinerError(f"{owner.flags[key]} needs {owner.spelling()}{why}")
    return None if cls is None else cls(**given)
