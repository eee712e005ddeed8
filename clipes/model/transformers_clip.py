"""CLIP checkpoints in Hugging Face transformers format (``CLIPModel``), run by the open_clip engine.

A transformers CLIP folder (``config.json`` with ``model_type: clip``, weights as safetensors or
``pytorch_model.bin``, possibly sharded) or hub id becomes an open_clip ``CLIP`` of the same layout
with the same weights: the engine (``vit``, ``text``) then runs it as any other CLIP. ``transformers``
itself is imported only here, and only when such a model is loaded: it reads the config (whose
saved form leaves out default values) and the folder's own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import brief
from ..images import CLIP_MEAN, CLIP_STD
from ..vit import mlp_ratio
from . import hub
from .base import ModelLoadError, how_to
from .checkpoint import read_state_dict

__all__ = ["ACTIVATIONS", "build_open_clip", "hub_folder", "is_hub_id", "load_folder", "load_hub_id", "model_files",
           "state_from_transformers", "weight_files"]

CONFIG = "config.json"
# image processor settings, alone or inside a processor's (transformers 5 writes the second)
PROCESSORS = {"preprocessor_config.json": None, "processor_config.json": "image_processor"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
# weights in the order transformers prefers them; an index names the shards of a sharded checkpoint
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
SHARD_PATTERNS = {"safetensors": ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
                  "bin": ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]}
# transformers' hidden_act -> open_clip's quick_gelu flag (GELU is exact erf in both)
ACTIVATIONS = {"quick_gelu": True, "gelu": False}
CLIP_VOCAB, CLIP_EOT = 49408, 49407  # CLIP's BPE (open_clip's SimpleTokenizer): vocabulary size, end of text
INSTALL = "pip install 'clipes[transformers]'"


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is spelled like a Hugging Face repo id (``org/name``)."""
    if spec.count("/") != 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hub_folder(repo_id: str, local_only: bool) -> Path:
    """The cached snapshot of a transformers CLIP repo with what :func:`load_folder` reads, fetched if needed.

    The config and tokenizer come first, so that a repo of another model type is refused before its
    weights are downloaded; then safetensors weights, or ``pytorch_model.bin`` where the repo has none.
    """
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))

    folder = fetch([CONFIG, *PROCESSORS, *TOKENIZER_FILES])
    _check_model_type(folder)
    _check_normalisation(folder)
    for patterns in SHARD_PATTERNS.values():
        folder = fetch(patterns)
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            break
    return folder


def _check_model_type(folder: Path) -> None:
    """Refuse a folder unless its ``config.json`` is a whole transformers CLIP's (``CLIPModel``)."""
    path = folder / CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a transformers model folder (no {CONFIG})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({brief(e)})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind in ("clip_vision_model", "clip_text_model"):
        tower = "vision" if kind == "clip_vision_model" else "text"
        raise ModelLoadError(f"{folder}: holds only CLIP's {tower} tower (model_type {kind!r}); clipes needs both "
                             "towers, a transformers CLIPModel (model_type 'clip')")
    if kind != "clip":
        raise ModelLoadError(f"{folder}: a transformers {kind!r} model, not a CLIP: clipes runs transformers "
                             "CLIPModel checkpoints (model_type 'clip': a ViT image tower and CLIP's text tower)")


def _differs(values, ours: tuple[float, ...]) -> bool:
    """Whether per-channel statistics are not ``ours``; 1e-3 lets configs that round CLIP's to 3 or 4
    places pass, and ImageNet's (0.485, ...) not."""
    try:
        return len(values) != len(ours) or max(abs(float(v) - o) for v, o in zip(values, ours, strict=True)) > 1e-3
    except (TypeError, ValueError):
        return True


def _check_normalisation(folder: Path) -> None:
    """Refuse a CLIP whose image processor normalises otherwise than CLIP's mean and std, which clipes uses."""
    for name, key in PROCESSORS.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: unreadable image processor settings ({brief(e)})") from None
        settings = raw.get(key, {}) if key and isinstance(raw, dict) else raw
        if not isinstance(settings, dict):
            continue
        if settings.get("do_normalize") is False:
            raise ModelLoadError(f"{path}: do_normalize false; clipes feeds CLIPs images normalised with CLIP's "
                                 "mean and std")
        for stat, ours in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            theirs = settings.get(stat)
            if theirs is not None and _differs(theirs, ours):
                raise ModelLoadError(f"{path}: {stat} {theirs}; clipes normalises images with CLIP's "
                                     f"{list(ours)}, so this model would see other inputs than it was trained on")


def _check_shard_names(index: Path, shards: list) -> None:
    """Every shard an index names is a file name of its folder: never a path out of it (``../x``, ``/x``)."""
    for shard in shards:
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise ModelLoadError(f"{index}: shard {shard!r} is not a file name inside {index.parent}; clipes reads "
                                 "weights only from the model's folder")


def _counted(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many layers ``prefix.<i>.`` the tensors hold (one more than the highest index)."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in state
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(found) + 1 if found else 0


def check_config_against_weights(config, state: dict[str, torch.Tensor], folder: Path) -> None:
    """The config's depths and widths against the tensors, before anything of its size is built: a config
    claiming 20000 blocks over weights of 3 is refused at once instead of building a model of 20000."""
    for tower, cfg in (("vision", config.vision_config), ("text", config.text_config)):
        model = f"{tower}_model"
        layers = _counted(state, f"{model}.encoder.layers.")
        if cfg.num_hidden_layers != layers:
            raise ModelLoadError(f"{folder}: its config gives the {tower} tower {cfg.num_hidden_layers} layers, its "
                                 f"weights hold {layers}")
        norm = state.get(f"{model}.encoder.layers.0.layer_norm1.weight")
        fc1 = state.get(f"{model}.encoder.layers.0.mlp.fc1.weight")
        shapes = {"hidden_size": (cfg.hidden_size, None if norm is None else norm.shape[0]),
                  "intermediate_size": (cfg.intermediate_size, None if fc1 is None else fc1.shape[0])}
        for name, (said, held) in shapes.items():
            if held is not None and said != held:
                raise ModelLoadError(f"{folder}: its config gives the {tower} tower {name} {said}, its weights "
                                     f"{held}")


def weight_files(folder: Path) -> list[Path]:
    """The files holding the folder's weights: one file, or the shards its index names."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path}: unreadable shard index ({brief(e)})") from None
        _check_shard_names(path, shards)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard {missing[0]} is missing from {folder}")
        return [folder / s for s in shards]
    raise ModelLoadError(f"{folder}: no PyTorch weights (model.safetensors or pytorch_model.bin, or their sharded "
                         "forms); clipes does not read TensorFlow or Flax weights")


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def model_files(folder: Path) -> list[Path]:
    """Every file that :func:`load_folder` reads: what a run's identity of this model hashes."""
    return [folder / CONFIG, *weight_files(folder), *_tokenizer_files(folder)]


_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # open_clip's block -> transformers' layer, but q/k/v
_TOWERS = {"visual.": "vision_model", "": "text_model"}  # open_clip's tower prefix -> transformers'


def state_from_transformers(state: dict[str, torch.Tensor], vision_layers: int,
                            text_layers: int) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict in open_clip's (and OpenAI's) layout.

    Tensors are renamed, q/k/v projections are stacked into the fused attention input projection
    and the two linear projections are transposed into open_clip's matrices; nothing is computed.
    Raises ``KeyError`` for a missing tensor and ``ValueError`` for one left over.
    """
    rename = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    with_bias = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                 "ln_final": "text_model.final_layer_norm"}
    attention = {}
    for (ours, theirs), layers in zip(_TOWERS.items(), (vision_layers, text_layers), strict=True):
        for i in range(layers):
            dst, src = f"{ours}transformer.resblocks.{i}", f"{theirs}.encoder.layers.{i}"
            with_bias.update({f"{dst}.{a}": f"{src}.{b}" for a, b in _BLOCK.items()})
            attention.update({f"{dst}.attn.in_proj_{p}": [f"{src}.self_attn.{qkv}_proj.{p}" for qkv in "qkv"]
                              for p in ("weight", "bias")})
    rename.update({f"{a}.{p}": f"{b}.{p}" for a, b in with_bias.items() for p in ("weight", "bias")})
    out = {ours: state[theirs] for ours, theirs in rename.items()}
    out.update({ours: torch.cat([state[t] for t in theirs]) for ours, theirs in attention.items()})
    out["visual.proj"] = state["visual_projection.weight"].T.contiguous()
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    used = {*rename.values(), *(t for theirs in attention.values() for t in theirs),
            "visual_projection.weight", "text_projection.weight"}
    left = sorted(k for k in state if k not in used and not k.endswith("position_ids"))  # buffers older saves hold
    if left:
        raise ValueError(f"tensors this CLIP layout has no place for: {', '.join(left[:3])}"
                         + (f" and {len(left) - 3} more" if len(left) > 3 else ""))
    return out


def _square(value, what: str, folder: Path) -> int:
    """An int from transformers' ``int | (h, w)`` sizes; clipes' CLIPs have square patches and images."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{folder}: {what} {list(value)} is not square; clipes runs CLIPs with square ones")
        value = value[0]
    return int(value)


def _mlp_ratio(cfg) -> float:
    return mlp_ratio(cfg.hidden_size, cfg.intermediate_size)


def build_open_clip(config, folder: Path) -> nn.Module:
    """An open_clip ``CLIP`` (random weights) of a transformers ``CLIPConfig``'s layout."""
    import open_clip

    vision, text = config.vision_config, config.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if len(acts) > 1 or not acts <= ACTIVATIONS.keys():
        raise ModelLoadError(f"{folder}: hidden_act {vision.hidden_act!r} (vision) and {text.hidden_act!r} (text): "
                             f"clipes runs CLIPs with one of {', '.join(ACTIVATIONS)} in both towers")
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg.layer_norm_eps != 1e-5:
            raise ModelLoadError(f"{folder}: {tower} layer_norm_eps {cfg.layer_norm_eps}: clipes runs CLIP's 1e-5")
    if vision.num_channels != 3:
        raise ModelLoadError(f"{folder}: a vision tower of {vision.num_channels} input channels; clipes runs RGB CLIPs")
    eos = text.eos_token_id
    if not isinstance(eos, int):
        raise ModelLoadError(f"{folder}: text eos_token_id {eos!r}: clipes needs one end-of-text token id")
    patch = _square(vision.patch_size, "patch_size", folder)
    return open_clip.CLIP(
        embed_dim=config.projection_dim,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=vision.num_hidden_layers, width=vision.hidden_size,
            head_width=vision.hidden_size // vision.num_attention_heads, mlp_ratio=_mlp_ratio(vision),
            patch_size=patch, image_size=_square(vision.image_size, "image_size", folder)),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=text.max_position_embeddings, vocab_size=text.vocab_size, width=text.hidden_size,
            heads=text.num_attention_heads, layers=text.num_hidden_layers, mlp_ratio=_mlp_ratio(text),
            # transformers pools at the argmax token for configs from before its fix of eos_token_id (2),
            # else at the first end-of-text token
            pool_type="argmax" if eos == 2 else "eos", eos_id=eos),
        quick_gelu=ACTIVATIONS[vision.hidden_act],
    )


def _tokenizer(folder: Path, config) -> Callable[[list[str]], torch.Tensor]:
    """The folder's own tokenizer when it has one (as transformers would use it), else CLIP's BPE."""
    import open_clip

    context = config.text_config.max_position_embeddings
    if _tokenizer_files(folder):
        try:
            return open_clip.tokenizer.HFTokenizer(str(folder), context_length=context)
        except Exception as e:
            raise ModelLoadError(f"{folder}: cannot read its tokenizer files ({brief(e)})") from None
    eos = config.text_config.eos_token_id
    if config.text_config.vocab_size != CLIP_VOCAB or eos not in (2, CLIP_EOT):
        raise ModelLoadError(f"{folder}: no tokenizer files, and its vocabulary ({config.text_config.vocab_size} "
                             f"tokens, end of text {eos}) is not CLIP's BPE; add the tokenizer it was trained with")
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def load_folder(folder: Path) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """The open_clip ``CLIP`` and tokenizer of a transformers CLIP folder, with the folder's weights exactly."""
    _check_model_type(folder)
    _check_normalisation(folder)
    try:
        from transformers import CLIPConfig
    except ImportError:
        raise ModelLoadError(f"{folder}: a transformers CLIP needs the transformers package ({INSTALL})") from None
    try:
        config = CLIPConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{folder / CONFIG}: not a valid CLIP config ({brief(e)})") from None
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(read_state_dict(path))
    check_config_against_weights(config, state, folder)
    model = build_open_clip(config, folder)
    try:
        mapped = state_from_transformers(state, config.vision_config.num_hidden_layers,
                                         config.text_config.num_hidden_layers)
        model.load_state_dict({k: v.float() for k, v in mapped.items()})
    except KeyError as e:
        raise ModelLoadError(f"{folder}: the weights lack {e.args[0]}, which its config's CLIP needs") from None
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{folder}: the weights do not fit its config's CLIP ({brief(e, 300)})") from None
    return model, _tokenizer(folder, config)


def load_hub_id(repo_id: str, flag: str = "--model") -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """A transformers CLIP from the hub: the cached copy when the hub cannot be reached or
    ``HF_HUB_OFFLINE`` is set, else fetched (only the files it needs)."""
    offline = hub.offline() or not hub.reachable()
    try:
        folder = hub_folder(repo_id, local_only=offline)
    except OSError as e:  # not cached, not on the hub, no access, no network (huggingface_hub's are OSErrors)
        where = "in the Hugging Face cache (the hub cannot be reached)" if offline else "on the Hugging Face hub"
        raise ModelLoadError(f"{repo_id!r}: no such folder, no transformers CLIP of that id {where} ({brief(e)}), "
                             f"nor an open_clip name (unknown open_clip architecture {repo_id.partition('/')[0]!r}; "
                             "see open_clip.list_models()). " + how_to(flag, repo_id)) from None
    return load_folder(folder)
