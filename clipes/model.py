"""Loading a frozen CLIP model: open_clip names, local checkpoints and Hugging Face hub ids."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from .defaults import DEFAULT_MODEL, MODEL_ENV
from .errors import ClipesError, brief
from .model_spec import LOCAL_HINT
from .weights import check_finite

__all__ = [
    "DEFAULT_MODEL", "MODEL_ENV", "ClipModel", "ModelLoadError", "cast_vision_weights", "fp32_layer_norms", "load_clip",
    "resolve_device",
]

TRANSFORMERS_ARCH = "transformers-clip"  # ClipModel.arch of a transformers CLIPModel folder or hub id
# for named weights (ARCH/TAG, hub ids): the cache is where a download would have put them
_HOW_TO = LOCAL_HINT + ("; or pre-download '{name}' into the Hugging Face cache (HF_HOME) on a machine with "
                        "internet access.")
# for a checkpoint path that does not exist: the cache has nothing to do with it
_HOW_TO_PATH = LOCAL_HINT + "."


class ModelLoadError(ClipesError):
    """The requested CLIP weights cannot be found, downloaded or understood."""


@dataclass
class ClipModel:
    """A frozen open_clip CLIP model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: str
    arch: str

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.conv1.kernel_size[0])

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def fp32_layer_norms(model: nn.Module) -> nn.Module:
    """Make every LayerNorm of ``model`` compute in fp32 and return its input's dtype, in place.

    As OpenAI's CLIP does, and what low precision needs: CUDA's layer norm refuses a bf16 input with
    fp32 weights (the text tower crashed so), the CPU's accepts it. For fp32 inputs nothing changes.
    """
    for module in model.modules():
        if type(module) in (nn.LayerNorm, open_clip.transformer.LayerNorm):
            module.__class__ = open_clip.transformer.LayerNormFp32
    return model


def cast_vision_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The vision tower's matrix weights (convolution, linear, attention, projection) in ``dtype``, once.

    Layer norms, embeddings and the text tower stay fp32: the text features are computed once per
    class set, in full precision.
    """
    if dtype != torch.float32:
        open_clip.model.convert_weights_to_lp(model.visual, dtype)
    return model


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from an OpenAI JIT archive or a (possibly wrapped) torch/safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # TorchScript archives are dispatched, fine
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as load_error:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    state = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({load_error})") from load_error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _from_openai_state_dict(state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Build the architecture from the tensors' shapes (OpenAI layout, also open_clip's for ViTs).

    Shapes cannot tell the activation: like OpenAI's models this uses QuickGELU. Checkpoints trained
    with GELU (most open_clip/LAION ones) are loaded with ``ARCH:PATH`` (e.g. ``ViT-B-16:ckpt.pt``).
    """
    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        raise ModelLoadError(
            f"{path}: cannot infer a CLIP ViT from this state dict (no visual.proj / visual.conv1). "
            "For other open_clip architectures pass --model ARCH:PATH, e.g. ViT-B-16:/path/to/ckpt.pt")
    # metadata and buffers that some exports carry (OpenAI's JIT archive, scripted open_clip models)
    extra = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    state = {k: v.float() for k, v in state.items() if k not in extra}
    try:
        # the builder rounds weights to fp16 (OpenAI's own files are fp16); reload them at full precision
        model = open_clip.model.build_model_from_openai_state_dict(dict(state)).float()
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: state dict does not match the inferred CLIP layout ({e})") from e
    return model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers at all (avoids minutes of download retries offline)."""
    if _hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_pretrained(arch: str, tag: str) -> str | None:
    """Local path of open_clip pretrained weights already in the Hugging Face cache, if any."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    sub = hub.strip("/").split("/", 2)
    repo = "/".join(sub[:2])
    names = [sub[2]] if len(sub) > 2 and sub[2] else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return hit
    return None


def _create_named(arch: str, tag: str | None, flag: str = "--model") -> nn.Module:
    """An open_clip architecture, randomly initialised (no tag) or with a pretrained tag's weights."""
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if tag is None:
        return open_clip.create_model(arch)
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise ModelLoadError(f"unknown pretrained tag {tag!r} for {arch}; known: {', '.join(tags)}")
    cached = _cached_pretrained(arch, tag)
    if cached:
        return open_clip.create_model(arch, pretrained=cached, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    if not _hub_reachable():
        raise ModelLoadError(f"weights for {arch}/{tag} are not cached and cannot be downloaded "
                             "(no network). " + _HOW_TO.format(flag=flag, name=f"{arch}/{tag}"))
    return open_clip.create_model(arch, pretrained=tag)


def _from_transformers_hub(repo_id: str, flag: str = "--model"
                           ) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """A transformers CLIP from the hub: the cached copy when the hub cannot be reached or
    ``HF_HUB_OFFLINE`` is set, else fetched (only the files it needs)."""
    from .transformers_clip import hub_folder, load_folder

    offline = _hub_offline() or not _hub_reachable()
    try:
        folder = hub_folder(repo_id, local_only=offline)
    except OSError as e:  # not cached, not on the hub, no access, no network (huggingface_hub's are OSErrors)
        where = "in the Hugging Face cache (the hub cannot be reached)" if offline else "on the Hugging Face hub"
        raise ModelLoadError(f"{repo_id!r}: no such folder, no transformers CLIP of that id {where} ({brief(e)}), "
                             f"nor an open_clip name (unknown open_clip architecture {repo_id.partition('/')[0]!r}; "
                             "see open_clip.list_models()). " + _HOW_TO.format(flag=flag, name=repo_id)) from None
    return load_folder(folder)


def _tokenizer_for(arch: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for a named architecture; CLIP's BPE tokenizer for OpenAI-layout checkpoints."""
    if arch.startswith("hf-hub:") or arch in open_clip.list_models():
        return open_clip.get_tokenizer(arch)
    return open_clip.tokenize


def load_clip(spec: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, flag: str = "--model") -> ClipModel:
    """Load frozen CLIP weights from ``spec``.

    ``spec`` is one of: ``ARCH/TAG`` (open_clip name and pretrained tag, e.g. ``ViT-B-16/openai``),
    ``ARCH`` alone (random weights, for tests and benchmarks), ``hf-hub:org/repo``, a path to an
    OpenAI-format or open_clip checkpoint (architecture inferred), ``ARCH:PATH``, or a Hugging Face
    transformers CLIP: a folder of ``CLIPModel.save_pretrained`` or a hub id ``org/repo``.
    ``None`` reads ``$CLIPES_MODEL`` and falls back to ``ViT-B-16/openai``. Errors tell the user to pass
    ``flag``, the option that gave ``spec``. ``dtype`` bf16 or fp16 casts the vision tower's matrix
    weights once (``cast_vision_weights``); layer norms compute in fp32 whatever the dtype, on every device.
    """
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = Path(spec).expanduser()
    arch_name, sep, arch_path = spec.partition(":")
    tokenizer = None
    try:
        if path.is_file():
            model, arch = _from_openai_state_dict(_read_checkpoint(path), path), "openai-state-dict"
        elif path.is_dir():
            from .transformers_clip import load_folder

            (model, tokenizer), arch = load_folder(path), TRANSFORMERS_ARCH
        elif sep and not spec.startswith("hf-hub:") and arch_name in open_clip.list_models():
            ckpt = Path(arch_path).expanduser()
            if not ckpt.is_file():
                raise ModelLoadError(f"checkpoint file not found: {ckpt}. " + _HOW_TO_PATH.format(flag=flag))
            model, arch = open_clip.create_model(arch_name, pretrained=str(ckpt)), arch_name
        elif spec.startswith("hf-hub:"):
            if not _hub_offline() and not _hub_reachable():
                raise ModelLoadError(f"cannot reach the Hugging Face hub to fetch {spec}; set HF_HUB_OFFLINE=1 "
                                     "to use a cached copy. " + _HOW_TO.format(flag=flag, name=spec))
            model, arch = open_clip.create_model(spec), spec
        elif spec.startswith(("/", "./", "~", "..")) or spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelLoadError(f"checkpoint file not found: {path}. " + _HOW_TO_PATH.format(flag=flag))
        else:
            from .transformers_clip import is_hub_id

            arch, _, tag = spec.partition("/")
            if tag and arch not in open_clip.list_models() and is_hub_id(spec):
                (model, tokenizer), arch = _from_transformers_hub(spec, flag), TRANSFORMERS_ARCH
            else:
                model = _create_named(arch, tag or None, flag)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load CLIP model {spec!r}: {e}. " + _HOW_TO.format(flag=flag, name=spec)) from e
    if not hasattr(model, "visual") or not hasattr(model.visual, "transformer"):
        raise ModelLoadError(f"{spec!r} is not a CLIP ViT (clipes needs a vision transformer)")
    check_finite(model.state_dict().items(), f"{flag} {spec}", ModelLoadError)  # every tower, by any path above
    model = fp32_layer_norms(model.to(device=device, dtype=torch.float32).eval().requires_grad_(False))
    cast_vision_weights(model, dtype)
    return ClipModel(model=model, tokenizer=tokenizer or _tokenizer_for(arch), spec=spec, arch=arch)
