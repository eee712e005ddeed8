"""``train-seg`` checkpoints: self-contained, versioned, and checked when read.

A checkpoint holds every weight of the segmenter (the frozen CLIP encoder included) and the
architecture needed to rebuild it, so ``clipes segment`` needs no CLIP file, download or path
recorded at training time. Format 1 (clipes before the version field) is still read; it rebuilds a
CLIP encoder's layout from the training-time CLIP spec, as that clipes did.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ClipesError
from ..output import atomic_write
from ..vit import mlp_ratio
from ..weights import check_finite

__all__ = ["FORMAT", "VERSION", "CheckpointError", "read_checkpoint", "rebuild_vision", "vision_spec",
           "write_checkpoint"]

FORMAT = "clipes-segmenter"
VERSION = 2


class CheckpointError(ClipesError):
    """A checkpoint cannot be read, is not a train-seg checkpoint, or has an unknown format."""


def vision_spec(visual: nn.Module) -> dict[str, Any]:
    """The layout of an open_clip ``VisionTransformer`` (what its weights do not say: the activation)."""
    from open_clip.transformer import QuickGELU

    blocks = visual.transformer.resblocks
    width = int(visual.conv1.out_channels)
    heads = int(blocks[0].attn.num_heads)
    patch = int(visual.conv1.kernel_size[0])
    grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    mlp = int(blocks[0].mlp.c_fc.out_features)  # rebuilt from; mlp_ratio stays for clipes before mlp_width
    return {"width": width, "layers": len(blocks), "head_width": width // heads,
            "mlp_width": mlp, "mlp_ratio": mlp / width, "patch_size": patch, "image_size": grid * patch,
            "output_dim": int(visual.proj.shape[1]) if getattr(visual, "proj", None) is not None else width,
            "quick_gelu": isinstance(blocks[0].mlp.gelu, QuickGELU),
            "layer_scale": not isinstance(blocks[0].ls_1, nn.Identity)}


def rebuild_vision(spec: dict[str, Any]) -> nn.Module:
    """An open_clip ``VisionTransformer`` of the layout ``vision_spec`` recorded (random weights). Specs before
    ``mlp_width`` hold its quotient by the width, which rounds back to it exactly."""
    import open_clip

    mlp = spec.get("mlp_width") or round(spec["mlp_ratio"] * spec["width"])
    cfg = open_clip.CLIPVisionCfg(layers=spec["layers"], width=spec["width"], head_width=spec["head_width"],
                                  mlp_ratio=mlp_ratio(spec["width"], mlp), patch_size=spec["patch_size"],
                                  image_size=spec["image_size"], ls_init_value=1.0 if spec["layer_scale"] else None)
    return open_clip.model._build_vision_tower(spec["output_dim"], cfg, quick_gelu=spec["quick_gelu"])


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` (model, optimizer, scheduler, step, best_miou, config, classes, arch) with the format
    and version, written atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    atomic_write(path, buf.getvalue())


_NEEDED = ("model", "config", "classes")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A train-seg checkpoint as a dict (``version`` filled in), or a one-line error saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle (empty, truncated, foreign file) is the same
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is damaged or not a PyTorch "
                              f"checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in _NEEDED):
        raise CheckpointError(f"{path}: not a clipes train-seg checkpoint")
    fmt, version = ckpt.get("format", FORMAT), ckpt.get("version", 1)
    if fmt != FORMAT or not isinstance(version, int):
        raise CheckpointError(f"{path}: not a clipes train-seg checkpoint (format {fmt!r})")
    if version > VERSION:
        raise CheckpointError(f"{path}: written by a newer clipes (checkpoint format {version}; this clipes reads "
                              f"up to {VERSION}); upgrade clipes")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: not a clipes train-seg checkpoint (no model weights or config)")
    check_metadata(ckpt, path)
    check_finite(ckpt["model"].items(), str(path), CheckpointError)
    return {**ckpt, "version": version}


# what a recorded CLIP vision layout holds: positive whole numbers, and two flags
_SPEC_INTS = ("width", "layers", "head_width", "patch_size", "image_size", "output_dim")
_SPEC_FLAGS = ("quick_gelu", "layer_scale")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_metadata(ckpt: dict[str, Any], path: Path) -> None:
    """The types of what a checkpoint says besides its weights, and its CLIP layout against its tensors, before
    anything is built from them (a layout of 20000 blocks would be allocated before failing to load)."""
    classes = ckpt["classes"]
    if not isinstance(classes, list | tuple) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: 'classes' must be a list of class names, not {classes!r:.60}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise CheckpointError(f"{path}: 'model' must map names to tensors")
    arch = ckpt.get("arch")
    if arch is not None and not isinstance(arch, dict):
        raise CheckpointError(f"{path}: 'arch' must be a mapping, not {type(arch).__name__}")
    spec = (arch or {}).get("clip_vision")
    if spec is not None:
        _check_vision_spec(spec, ckpt["model"], path)


def _check_vision_spec(spec, state: dict[str, torch.Tensor], path: Path) -> None:
    where = f"{path}: arch.clip_vision"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} must be a mapping, not {type(spec).__name__}")
    for key in _SPEC_INTS:
        if not _whole(spec.get(key)):
            raise CheckpointError(f"{where}: {key} must be a whole number above 0, not {spec.get(key)!r:.40}")
    for key in _SPEC_FLAGS:
        if not isinstance(spec.get(key), bool):
            raise CheckpointError(f"{where}: {key} must be true or false, not {spec.get(key)!r:.40}")
    mlp = spec.get("mlp_width")
    if mlp is None and (not isinstance(spec.get("mlp_ratio"), int | float) or not 0 < spec["mlp_ratio"] < 1e3):
        raise CheckpointError(f"{where}: needs mlp_width (a whole number) or mlp_ratio (a number above 0)")
    if mlp is not None and not _whole(mlp):
        raise CheckpointError(f"{where}: mlp_width must be a whole number above 0, not {mlp!r:.40}")
    conv = next((k for k in state if k.endswith("visual.conv1.weight")), None)
    if conv is None:
        raise CheckpointError(f"{where} is recorded but the weights hold no CLIP vision tower (visual.conv1)")
    prefix = conv[: -len("conv1.weight")]
    blocks = {k[len(prefix) + len("transformer.resblocks."):].split(".", 1)[0] for k in state
              if k.startswith(prefix + "transformer.resblocks.")}
    held = {"width": state[conv].shape[0], "patch_size": state[conv].shape[-1],
            "layers": max((int(b) + 1 for b in blocks if b.isdigit()), default=0)}
    fc = state.get(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    if mlp is not None and fc is not None:
        held["mlp_width"] = fc.shape[0]
    grid = spec["image_size"] // spec["patch_size"]
    tokens = state.get(prefix + "positional_embedding")
    if tokens is not None and tokens.shape[0] != grid * grid + 1:
        raise CheckpointError(f"{where}: image_size {spec['image_size']} / patch_size {spec['patch_size']} makes "
                              f"{grid * grid + 1} tokens, its weights {tokens.shape[0]}")
    for key, value in held.items():
        if spec[key] != value:
            raise CheckpointError(f"{where}: {key} {spec[key]}, but its weights have {value}")
    if spec["width"] % spec["head_width"]:
        raise CheckpointError(f"{where}: head_width {spec['head_width']} does not divide width {spec['width']}")
