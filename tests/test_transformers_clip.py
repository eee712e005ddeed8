"""Hugging Face transformers CLIP checkpoints: folders and hub ids loaded onto the engine's model exactly.

Tiny random ``CLIPModel``s are built from a ``CLIPConfig`` and saved in the test; transformers' own
forward passes are the reference. No network: hub ids come from a cache laid out in the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.model import ModelLoadError, hub, load_clip
from clipes.provenance import model_identity
from clipes.text import encode_text
from clipes.vit import cls_embedding, encode_trunk, interpolate_pos_embed

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "a   photo of the dog", "bottle", "a blurry photo of a potted plant on a table"]


def _clip_bpe_tokenizer():
    """CLIP's BPE as a transformers tokenizer, made from open_clip's copy of the vocabulary (no download)."""
    import open_clip

    simple = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in simple.encoder.items()}
    merges = [m for m, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _word_tokenizer():
    """A small word-level tokenizer unlike CLIP's: the folder's own tokenizer must be the one used."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *sorted({w for t in TEXTS for w in t.lower().split()})]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2),
                                                                                             ("[EOS]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]")


def _config(act: str = "quick_gelu", eos: int = 49407, vocab: int = 49408, context: int = 77,
            text: dict | None = None, **vision):
    """A tiny CLIP; MLP widths not 4x and 32-wide heads by default, so that nothing rests on OpenAI's ratios."""
    text = dict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act=act,
                     eos_token_id=eos, vocab_size=vocab, max_position_embeddings=context), **(text or {}))
    vision = dict(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=2,
                       patch_size=16, image_size=64, hidden_act=act), **vision)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _save(folder: Path, config, tokenizer=None, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(2.3)  # not the init value, so that its mapping is seen
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return hf


def _pooled(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns the output object, 4 the tensor


@pytest.fixture(scope="module")
def quick_folder(tmp_path_factory):
    """OpenAI's kind of CLIP (QuickGELU) with CLIP's BPE tokenizer files, as the hub's openai/clip-* are."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    hf = _save(folder, _config(), _clip_bpe_tokenizer())
    transformers.CLIPImageProcessor().save_pretrained(folder)  # CLIP's mean and std, as clipes normalises
    return folder, hf, _clip_bpe_tokenizer()


@pytest.mark.parametrize("act,eos", [("quick_gelu", 49407), ("gelu", 2)])
def test_embeddings_equal_transformers(tmp_path, act, eos):
    """Image and text embeddings equal transformers' projected pooled outputs (GELU is exact erf in both;
    eos 2 is transformers' legacy argmax pooling, 49407 its end-of-text pooling)."""
    tok = _clip_bpe_tokenizer()
    hf = _save(tmp_path / "m", _config(act, eos), tok)
    clip = load_clip(str(tmp_path / "m"))
    assert clip.arch == "transformers-clip" and clip.patch_size == 16
    assert len(clip.visual.transformer.resblocks) == 3 and clip.visual.transformer.resblocks[0].attn.num_heads == 2
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert float(clip.model.logit_scale) == pytest.approx(2.3)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_img = _pooled(hf.get_image_features(pixel_values=images))
        ref_txt = _pooled(hf.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")))
        engine_img = cls_embedding(clip.visual, encode_trunk(clip.visual, images)[0])
        ours_txt = encode_text(clip.model, clip.tokenizer(TEXTS))
    # one network in two implementations: sums in other orders, float32 rounding only
    np.testing.assert_allclose(clip.model.encode_image(images), ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(engine_img, ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_txt, ref_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(clip.model.encode_text(clip.tokenizer(TEXTS)), ref_txt, atol=1e-5, rtol=0)


def test_non_square_input_through_transformers_layers(quick_folder):
    """A 48x80 input: the engine's resized position embeddings, then transformers' own layers agree."""
    folder, hf, _ = quick_folder
    clip = load_clip(str(folder))
    torch.manual_seed(2)
    images = torch.randn(1, 3, 48, 80)
    vm = hf.vision_model
    with torch.no_grad():
        x = vm.embeddings.patch_embedding(images).flatten(2).transpose(1, 2)
        x = torch.cat([vm.embeddings.class_embedding.expand(1, 1, -1), x], dim=1)
        x = x + interpolate_pos_embed(vm.embeddings.position_embedding.weight, (3, 5))
        x = vm.encoder(inputs_embeds=vm.pre_layrnorm(x)).last_hidden_state
        ref = hf.visual_projection(vm.post_layernorm(x[:, 0]))
        trunk, attn = encode_trunk(clip.visual, images)
        ours = cls_embedding(clip.visual, trunk)
    assert trunk.shape == (1, 16, 64) and attn.shape == (1, 15, 15)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_folder_tokenizer_when_not_clips(tmp_path):
    """A folder with its own (non-CLIP) tokenizer and a 16-token context: that tokenizer, that pooling."""
    tok = _word_tokenizer()
    hf = _save(tmp_path / "m", _config(eos=3, vocab=64, context=16), tok)
    clip = load_clip(str(tmp_path / "m"))
    tokens = clip.tokenizer(TEXTS)
    assert tokens.shape == (len(TEXTS), 16) and (tokens == 3).sum(dim=1).tolist() == [1] * len(TEXTS)
    with torch.no_grad():
        ref = _pooled(hf.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")))
        ours = encode_text(clip.model, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_no_tokenizer_files_is_clips_bpe(tmp_path, quick_folder):
    """``CLIPModel.save_pretrained`` alone writes no tokenizer: CLIP's BPE, as transformers' CLIPTokenizer."""
    _save(tmp_path / "m", _config())
    clip = load_clip(str(tmp_path / "m"))
    ref = quick_folder[2](TEXTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours = clip.tokenizer(TEXTS)
    eos = ref.argmax(dim=1)  # padding differs (0 against end-of-text), and comes after the end, unseen
    assert torch.equal(eos, ours.argmax(dim=1))
    assert all(torch.equal(ref[i, :e + 1], ours[i, :e + 1]) for i, e in enumerate(eos.tolist()))


def test_sharded_and_bin_weights(tmp_path, quick_folder):
    folder, hf, _ = quick_folder
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "bin")
    torch.save({k: v.half() for k, v in hf.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    ref = load_clip(str(folder)).model.state_dict()
    for name in ("sharded", "bin"):
        state = load_clip(str(tmp_path / name)).model.state_dict()
        assert state.keys() == ref.keys()
        for k, v in state.items():  # the fp16 file holds the weights rounded to fp16, read back to fp32
            assert torch.equal(v, ref[k].half().float() if name == "bin" else ref[k]), (name, k)


def test_label_same_as_openai_layout(tmp_path, golden):
    """``clipes label`` gives the same CAMs and masks with the folder as with its weights in OpenAI layout."""
    folder = tmp_path / "hf"
    # what OpenAI-layout inference assumes (64-wide heads, 4x MLPs) and CAA's 8 blocks; no tokenizer files,
    # so CLIP's BPE on both sides
    _save(folder, _config(text=dict(num_attention_heads=1, intermediate_size=256), hidden_size=128,
                          num_attention_heads=2, intermediate_size=512, num_hidden_layers=8))
    openai = tmp_path / "openai.pt"
    torch.save(load_clip(str(folder)).model.state_dict(), openai)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((150, 100)).save(images / "chelsea.png")
    Image.open(golden / "images" / "coffee.png").resize((64, 64)).save(images / "coffee.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    runner = CliRunner()
    for name, model in (("a", folder), ("b", openai)):
        res = runner.invoke(app, ["label", str(images), "--out", str(tmp_path / name), "--model", str(model),
                                  "--labels", str(labels), "--save-cams", "--device", "cpu", "--workers", "0"])
        assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "transformers-clip"
    for stem in ("chelsea", "coffee"):
        a, b = np.load(tmp_path / "a" / "cams" / f"{stem}.npz"), np.load(tmp_path / "b" / "cams" / f"{stem}.npz")
        # same kernels on the same weights and tokens: equal bit for bit
        for key in ("cam", "cam_refined"):
            np.testing.assert_array_equal(a[key], b[key])
        assert np.asarray(Image.open(tmp_path / "a" / "masks" / f"{stem}.png")).any()
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "masks" / f"{stem}.png")),
                                      np.asarray(Image.open(tmp_path / "b" / "masks" / f"{stem}.png")))


def test_hub_id_from_the_cache(tmp_path, monkeypatch, quick_folder):
    """``org/repo`` is a transformers hub id, read from the cache offline (a snapshot laid out here)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-clip"
    commit = "0" * 40
    shutil.copytree(quick_folder[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    clip = load_clip("someone/tiny-clip")
    assert clip.arch == "transformers-clip" and clip.spec == "someone/tiny-clip"
    ref = load_clip(str(quick_folder[0]))
    assert torch.equal(clip.model.visual.proj, ref.model.visual.proj)
    assert torch.equal(clip.tokenizer(TEXTS), ref.tokenizer(TEXTS))
    with pytest.raises(ModelLoadError, match="no transformers CLIP of that id in the Hugging Face cache.*--model"):
        load_clip("someone/not-cached")
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture 'ViT-Nope-99'"):
        load_clip("ViT-Nope-99/openai")


def test_folder_identity_is_its_content(tmp_path, quick_folder):
    folder = quick_folder[0]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert model_identity(str(folder)).startswith("sha256:")
    assert model_identity(str(copy)) == model_identity(str(folder))
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert model_identity(str(copy)) != model_identity(str(folder))


def _one_line_error(tmp_path: Path, spec: str) -> str:
    """What ``clipes label --model spec`` says: exit status 2, one ``error:`` line, nothing written."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    res = CliRunner(env={"COLUMNS": "4000"}).invoke(
        app, ["label", str(images), "--out", str(tmp_path / "out"), "--model", spec, "--device", "cpu"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if "error:" in line]
    assert len(lines) == 1 and not (tmp_path / "out").exists(), res.output
    return lines[0]


def test_wrong_folders_are_refused(tmp_path, quick_folder):
    folder, hf, _ = quick_folder
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = "not a transformers model folder (no config.json)"
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    cases["siglip"] = "a transformers 'siglip' model, not a CLIP"
    transformers.CLIPVisionModelWithProjection(_config().vision_config).save_pretrained(tmp_path / "vision")
    cases["vision"] = "holds only CLIP's vision tower"
    (tmp_path / "no-weights").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "no-weights")
    cases["no-weights"] = "no PyTorch weights"
    (tmp_path / "partial").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "partial")
    torch.save({k: v for k, v in hf.state_dict().items() if "text_projection" not in k},
               tmp_path / "partial" / "pytorch_model.bin")
    cases["partial"] = "the weights lack text_projection.weight"
    _save(tmp_path / "tanh", _config("gelu_new"))
    cases["tanh"] = "hidden_act 'gelu_new' (vision) and 'gelu_new' (text): clipes runs CLIPs with one of quick_gelu"
    _save(tmp_path / "other-layout", _config())
    config = tmp_path / "other-layout" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 3', '"num_hidden_layers": 2'))
    cases["other-layout"] = "its config gives the vision tower 2 layers, its weights hold 3"  # before building
    for name, nested in (("imagenet", False), ("imagenet-processor", True)):
        shutil.copytree(folder, tmp_path / name)
        (tmp_path / name / "preprocessor_config.json").unlink()
        processor = transformers.CLIPImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        if nested:  # as transformers 5 saves a whole CLIPProcessor
            transformers.CLIPProcessor(image_processor=processor, tokenizer=quick_folder[2]).save_pretrained(
                tmp_path / name)
            assert not (tmp_path / name / "preprocessor_config.json").exists()
        else:
            processor.save_pretrained(tmp_path / name)
        cases[name] = "image_mean [0.485, 0.456, 0.406]; clipes normalises images with CLIP's"
    for name, message in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_clip(str(tmp_path / name))
        assert message in str(info.value), (name, str(info.value))
        assert str(tmp_path / name) in str(info.value)
    assert cases["siglip"] in _one_line_error(tmp_path, str(tmp_path / "siglip"))


def test_hub_fetches_the_config_first_then_pytorch_weights(tmp_path, monkeypatch, quick_folder):
    """Online, a hub id fetches config and tokenizer, then safetensors or else ``pytorch_model.bin``; a repo
    of another model type is refused before any weights are fetched."""
    from fnmatch import fnmatch

    import huggingface_hub

    folder, hf, _ = quick_folder
    repos = {"someone/bin-only": tmp_path / "bin-only", "someone/siglip": tmp_path / "siglip"}
    for repo in repos.values():
        repo.mkdir()
        shutil.copy(folder / "config.json", repo)
    torch.save(hf.state_dict(), repos["someone/bin-only"] / "pytorch_model.bin")
    (repos["someone/siglip"] / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    (repos["someone/siglip"] / "model.safetensors").write_bytes(b"weights not to fetch")
    fetched: list[list[str]] = []

    def snapshot_download(repo_id, allow_patterns, local_files_only):
        assert not local_files_only
        snapshot = tmp_path / "cache" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in sorted(repos[repo_id].iterdir()) if any(fnmatch(f.name, p) for p in allow_patterns)]
        for name in names:
            shutil.copy(repos[repo_id] / name, snapshot)
        fetched.append(names)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    clip = load_clip("someone/bin-only")
    assert fetched == [["config.json"], [], ["pytorch_model.bin"]]
    assert torch.equal(clip.model.visual.proj, load_clip(str(folder)).model.visual.proj)
    fetched.clear()
    with pytest.raises(ModelLoadError, match="a transformers 'siglip' model, not a CLIP"):
        load_clip("someone/siglip")
    assert fetched == [["config.json"]]


def test_without_transformers_says_what_to_install(tmp_path, monkeypatch, quick_folder):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ModelLoadError, match=r"transformers package \(pip install 'clipes\[transformers\]'\)"):
        load_clip(str(quick_folder[0]))
