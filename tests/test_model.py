"""Model loading: checkpoint formats, architecture inference, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipes.model import ModelLoadError, hub, load_clip, named, resolve_device

from .conftest import make_tiny_openclip


def _features(model: torch.nn.Module) -> np.ndarray:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.encode_image(torch.randn(1, 3, 64, 64)).numpy()


@pytest.mark.parametrize("variant", ["plain", "fp16", "module_prefix", "wrapped"])
def test_openai_layout_state_dicts(tmp_path, variant):
    ref = make_tiny_openclip()
    state = ref.state_dict()
    if variant == "fp16":
        state = {k: v.half() for k, v in state.items()}
        ref.load_state_dict({k: v.float() for k, v in state.items()})
    if variant == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    if variant == "wrapped":
        state = {"state_dict": state, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    clip = load_clip(str(path))
    assert clip.dtype == torch.float32 and clip.patch_size == 16
    assert len(clip.visual.transformer.resblocks) == 4
    assert not any(p.requires_grad for p in clip.model.parameters())
    np.testing.assert_allclose(_features(clip.model), _features(ref), atol=1e-5)


def test_golden_checkpoint_layout(golden):
    clip = load_clip(str(golden / "tiny-clip-vit-b16-random.pt"))
    visual = clip.visual
    assert len(visual.transformer.resblocks) == 12 and visual.transformer.resblocks[0].attn.num_heads == 2
    assert abs(float(clip.model.logit_scale.exp()) - 10.0) < 0.01
    assert clip.tokenizer(["a cat"]).shape == (1, 77)


def test_torchscript_archive(tmp_path):
    ref = make_tiny_openclip()
    scripted = torch.jit.script(ref)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    clip = load_clip(str(path))
    assert len(clip.visual.transformer.resblocks) == 4
    np.testing.assert_allclose(_features(clip.model), _features(ref), atol=1e-5)


def test_open_clip_arch_and_checkpoint(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-B-16")
    path = tmp_path / "openclip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    clip = load_clip(f"ViT-B-16:{path}")
    assert clip.arch == "ViT-B-16" and len(clip.visual.transformer.resblocks) == 12


def test_missing_and_bad_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint file not found.*--model"):
        load_clip(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        load_clip(f"ViT-B-16:{tmp_path / 'missing.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_clip(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelLoadError, match="cannot infer a CLIP ViT"):
        load_clip(str(other))
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        load_clip("ViT-Nope-99/openai")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        load_clip("ViT-B-16/not-a-tag")


def test_unavailable_default_weights_say_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(named, "cached_pretrained", lambda arch, tag: None)
    monkeypatch.delenv("CLIPES_MODEL", raising=False)
    with pytest.raises(ModelLoadError) as info:
        load_clip(None)
    msg = str(info.value)
    assert "ViT-B-16/openai" in msg and "--model" in msg and "CLIPES_MODEL" in msg


def test_env_variable_names_the_model(monkeypatch, golden):
    monkeypatch.setenv("CLIPES_MODEL", str(golden / "tiny-clip-vit-b16-random.pt"))
    assert load_clip(None).spec.endswith("tiny-clip-vit-b16-random.pt")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--device cpu"):
            resolve_device("cuda")
