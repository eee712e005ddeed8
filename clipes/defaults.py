"""Defaults the command line names before torch and open_clip load (the CLIP model and the variable that
overrides it, --dtype's variable, CAA's blocks, export's --min-area) and the parser of --caa-blocks, in a
module without heavy imports."""

from .errors import ClipesError

DEFAULT_MODEL = "ViT-B-16/openai"
MODEL_ENV = "CLIPES_MODEL"
DTYPE_ENV = "CLIPES_DTYPE"  # --dtype
# export --format coco --instances drops regions under this many pixels (a 4x4 block): a CRF-refined mask breaks
# into hundreds of fragments, many of a pixel or two (127 of one pixel among 695 regions of 9 images), more
# than COCOeval's 100 detections an image; their pixels are left unannotated, as background is. 0 keeps all.
MIN_AREA = 16
CAA_BLOCKS = "-8:"  # CLIP-ES: the attention of the last eight blocks (TagCLIP's label-free VOC run: "-8:-1")


def block_slice(spec: str) -> slice:
    """``START:STOP`` (either may be empty or negative) as a slice; a ``ClipesError`` naming --caa-blocks if not."""
    parts = str(spec).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ClipesError(f"--caa-blocks {spec!r}: not a slice START:STOP of the ViT's blocks, such as -8: or "
                          "-8:-1") from None
    return slice(start, stop)
