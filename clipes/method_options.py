"""The names of the pluggable methods of ``clipes label`` and the flags that belong to each, without torch.

One table per registry (refiners, CAM methods, taggers): the classes read their ``flags`` from here, and
``check_method_options`` refuses a flag given to a method that does not take it before torch loads, in
the words the registries use (``make_refiner``, ``make_cam``, ``tagger_class``).
"""

from __future__ import annotations

from .errors import ClipesError

__all__ = ["CAM_FLAGS", "CRF_BACKENDS", "DENSE_CAMS", "DENSE_FLAGS", "PAMR_BY_DEFAULT", "REFINER_FLAGS", "TAGGERS",
           "MethodOptionError", "cam_spelling", "check_method_options", "refiner_spelling", "run_refiner",
           "run_tagger"]

# constructor keyword -> the clipes label flag that sets it
REFINER_FLAGS: dict[str, dict[str, str]] = {
    "crf": {"confidence": "--confidence"},
    "par": {"bg_high": "--par-bg-high", "bg_low": "--par-bg-low", "iterations": "--par-iterations"},
    # PAR's keyword too: ``check_method_options`` takes "iterations" as PAR's (its first owner), PAMR's apart
    "pamr": {"iterations": "--pamr-iterations"},
}
# a dense method's protocol settings (clipes.cams.dense), the same for the four of them; its PAMR steps
# (NACLIP's) are turned off by --refine none
DENSE_FLAGS: dict[str, str] = {"scale": "--dense-scale", "window": "--dense-window", "stride": "--dense-stride",
                               "logit_scale": "--dense-logit-scale", "prob_threshold": "--dense-prob",
                               "pamr_steps": "--refine none"}
DENSE_CAMS = ("maskclip", "sclip", "clearclip", "naclip")
PAMR_BY_DEFAULT = ("naclip",)  # the dense methods whose authors refine with PAMR (its DenseProtocol.pamr_steps)
CAM_FLAGS: dict[str, dict[str, str]] = {"gradcam": {}, "getam": {"start": "--getam-start"},
                                        **{name: DENSE_FLAGS for name in DENSE_CAMS}}
TAGGERS = ("tagclip", "global")
CRF_BACKENDS = ("torch", "pydensecrf")


class MethodOptionError(ClipesError):
    """A method name that is not registered, or a flag given to a method that does not take it."""


def refiner_spelling(name: str) -> str:
    """How the CLI asks for refiner ``name`` (the CRF has its own switch)."""
    return "--crf" if name == "crf" else f"--refine {name}"


def cam_spelling(name: str) -> str:
    return f"--cam {name}"


def _owner(table: dict[str, dict[str, str]], key: str) -> str:
    return next(name for name, flags in table.items() if key in flags)


def run_refiner(refine: str | None, cam: str) -> str | None:
    """The refiner a run uses: ``refine`` (None or "none": none), except that a dense method whose authors
    refine with PAMR takes it unless told ``--refine none``."""
    if refine is None and cam in PAMR_BY_DEFAULT:
        return "pamr"
    return None if refine in (None, "none") else refine


def run_tagger(tagger: str, cam: str, labels_given: bool) -> str | None:
    """The tagger a run uses: none with given labels, nor for a dense method (its open-vocabulary mask)."""
    return None if labels_given or cam in DENSE_CAMS else tagger


def check_method_options(refine: str | None, cam: str, tagger: str, *, crf_backend: str | None = None,
                         pamr_iterations: int | None = None, **options: object) -> None:
    """Refuse unknown method names and options that belong to another method, before torch loads.

    ``options`` are the refiners' and CAM methods' constructor keywords (None: not given), named as in
    ``REFINER_FLAGS`` and ``CAM_FLAGS`` ("iterations" is PAR's); ``pamr_iterations`` is PAMR's.
    """
    used = run_refiner(refine, cam)
    refine = None if refine in (None, "none") else refine
    if refine is not None and refine not in REFINER_FLAGS:
        raise MethodOptionError(f"--refine {refine!r}: choose one of {', '.join(REFINER_FLAGS)} or none")
    if cam not in CAM_FLAGS:
        raise MethodOptionError(f"--cam {cam!r}: choose one of {', '.join(CAM_FLAGS)}")
    if tagger not in TAGGERS:
        raise MethodOptionError(f"--tagger {tagger!r}: choose one of {', '.join(TAGGERS)}")
    for key, value in options.items():
        if value is None:
            continue
        if any(key in flags for flags in REFINER_FLAGS.values()):
            owner = _owner(REFINER_FLAGS, key)
            if refine is None or REFINER_FLAGS[refine].get(key) != REFINER_FLAGS[owner][key]:
                why = "" if refine is None else f", not {refiner_spelling(refine)}"
                raise MethodOptionError(f"{REFINER_FLAGS[owner][key]} needs {refiner_spelling(owner)}{why}")
        elif any(key in flags for flags in CAM_FLAGS.values()):
            if key not in CAM_FLAGS[cam]:
                owner = _owner(CAM_FLAGS, key)
                dense = f"a dense method (--cam {'|'.join(DENSE_CAMS)})"
                wanted = dense if owner in DENSE_CAMS else cam_spelling(owner)
                raise MethodOptionError(f"{CAM_FLAGS[owner][key]} needs {wanted}, not {cam_spelling(cam)}")
        else:
            raise TypeError(f"no method takes the option {key!r}")
    if cam in DENSE_CAMS and refine not in (None, "pamr"):
        raise MethodOptionError(f"--refine {refine}: {cam_spelling(cam)} makes its own masks; its refiner "
                                "is pamr or none")
    if pamr_iterations is not None and used != "pamr":
        raise MethodOptionError("--pamr-iterations needs --refine pamr (or --cam naclip, whose default it is)")
    if crf_backend is not None:
        if crf_backend not in CRF_BACKENDS:
            raise MethodOptionError(f"--crf-backend {crf_backend!r}: choose one of {', '.join(CRF_BACKENDS)}")
        if refine != "crf":
            raise MethodOptionError("--crf-backend needs --crf (or --refine crf)")
    low, high = options.get("bg_low"), options.get("bg_high")
    if refine == "par" and low is not None and high is not None and low > high:
        raise MethodOptionError(f"--par-bg-low {low} is above --par-bg-high {high}: the low run must give less "
                                "background")
