"""The labelling path's fast computations against the plain ones they replace, on the golden images.

Fused attention in the trunk (its maps computed apart, head mean only) against nn.MultiheadAttention
with its weights, block by block; batched post-processing against the per-image functions; low
precision from weights cast once; the dtype ``auto`` takes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import clipes.labeler as labeler_module
from clipes.caa import caa_blocks
from clipes.vit import embed, encode_trunk

from .conftest import GOLDEN

IMAGES = sorted(p.name for p in (GOLDEN / "images").glob("*.png")) if GOLDEN.is_dir() else []


def mha_trunk(visual, images: torch.Tensor, attn_blocks: int | range = 8, stop: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk as the authors run it: nn.MultiheadAttention with its head-averaged weights in every block."""
    x = embed(visual, images)
    blocks = visual.transformer.resblocks
    kept = attn_blocks if isinstance(attn_blocks, range) else range(len(blocks) - attn_blocks, len(blocks))
    total = 0
    for i, block in enumerate(blocks[:len(blocks) - 1 if stop is None else stop]):
        h = block.ln_1(x)
        out, w = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if i in kept:
            total = total + w[:, 1:, 1:]
    return x, total


@pytest.mark.parametrize("name", IMAGES)
def test_fused_trunk_equals_attention_with_weights(labeler, golden, golden_labels, name):
    """Same tokens and CAA attention as the blocks computing their weights (fp32, within 1e-6)."""
    p = labeler.prepare(Image.open(golden / "images" / name), golden_labels[name])
    images = p.tensor[None]
    tokens, attn = encode_trunk(labeler.clip.visual, images)
    ref_tokens, ref_attn = mha_trunk(labeler.clip.visual, images)
    scale = float(ref_tokens.abs().max())
    np.testing.assert_allclose(tokens / scale, ref_tokens / scale, rtol=0, atol=1e-6)
    np.testing.assert_allclose(attn, ref_attn, rtol=0, atol=1e-6)


def test_fused_trunk_cams_equal_attention_with_weights(labeler, golden, golden_labels, monkeypatch):
    """Through the Labeler: probabilities within 1e-6 of the MHA trunk's, attention within 1e-7, CAMs
    within 5e-6: the tokens differ by fp32 rounding (1 ulp, about 5e-7 at their scale of 6), which the
    gradient and the CAM's two min-max normalisations (by maxima near 1e-2 before the first) amplify;
    measured at most 1.1e-6 here, and 1.7e-6 against the chunked softmax @ v it replaces."""
    images = [Image.open(golden / "images" / n) for n in IMAGES]
    labels = [golden_labels[n] for n in IMAGES]
    fast = labeler.label_batch(images, labels)
    monkeypatch.setattr(labeler_module, "encode_trunk", mha_trunk)
    slow = labeler.label_batch(images, labels)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.cam, b.cam, rtol=0, atol=5e-6)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.attention, b.attention, rtol=0, atol=1e-7)


def test_trunk_maps_of_chosen_blocks(labeler):
    """A range picks the blocks whose attention is summed; the default is CAA's."""
    visual = labeler.clip.visual
    images = torch.randn(1, 3, 64, 48)
    _, every = encode_trunk(visual, images, range(11))
    _, none = encode_trunk(visual, images, range(0))
    tokens, default = encode_trunk(visual, images)
    _, chosen = encode_trunk(visual, images, caa_blocks("-8:", 12))
    assert not none.any() and torch.equal(default, chosen)
    assert (every - default).min() >= 0 and (every - default).sum() > 0  # four more blocks' weights
    assert tokens.shape == (1, 13, visual.transformer.width)



# --dtype auto

def test_auto_takes_bf16_on_gpus_and_on_cpus_with_bf16_units(monkeypatch):
    from clipes import precision

    monkeypatch.delenv(precision.DTYPE_ENV, raising=False)
    assert precision.resolve_dtype(None, torch.device("cuda")).name == "bfloat16"
    monkeypatch.setattr(precision, "_this_cpu", lambda: ("amx_bf16",))
    fast = precision.resolve_dtype("auto", torch.device("cpu"))
    assert fast.name == "bfloat16" and "amx_bf16" in fast.reason
    monkeypatch.setattr(precision, "_this_cpu", lambda: ())
    slow = precision.resolve_dtype(None, torch.device("cpu"))
    assert slow.name == "float32" and "no bf16 matrix unit" in slow.reason
    # an asked-for low precision is kept, with a warning that says what was measured
    monkeypatch.setattr(precision, "cpu_matmul_speedup", lambda dtype: 0.65)
    asked = precision.resolve_dtype("bfloat16", torch.device("cpu"))
    assert asked.name == "bfloat16" and "0.65x" in precision.slow_low_precision(asked, torch.device("cpu"))
    assert precision.slow_low_precision(slow, torch.device("cpu")) is None
    monkeypatch.setenv(precision.DTYPE_ENV, "float16")
    assert precision.resolve_dtype(None, torch.device("cpu")).name == "float16"
    with pytest.raises(ValueError, match="choose auto"):
        precision.resolve_dtype("float64", torch.device("cpu"))


def test_cpu_matmul_speedup_is_measured_once():
    from clipes.precision import cpu_matmul_speedup

    first = cpu_matmul_speedup(torch.bfloat16)
    assert 0 < first < float("inf") and cpu_matmul_speedup(torch.bfloat16) == first


def test_label_auto_says_which_dtype_and_a_resume_keeps_the_recorded_one(golden, tmp_path, monkeypatch):
    import json

    from rich.console import Console

    from clipes import precision
    from clipes.run import LabelConfig, label_folder

    images = tmp_path / "images"
    images.mkdir()
    Image.open(golden / "images" / "chelsea.png").save(images / "chelsea.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"]}))
    monkeypatch.delenv(precision.DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "_this_cpu", lambda: ())
    cfg = LabelConfig(images=images, out=tmp_path / "out", labels=labels,
                      model=str(golden / "tiny-clip-vit-b16-random.pt"), device="cpu")
    console = Console(record=True, width=200)
    label_folder(cfg, console)
    assert "dtype: float32 (auto: this CPU has no bf16 matrix unit" in console.export_text()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["dtype"] == "float32"
    assert manifest["dtype"] == {"name": "float32", "reason": "auto: this CPU has no bf16 matrix unit (amx_bf16 nor "
                                                              "avx512_bf16), where bf16 is emulated and slower"}
    # the same folder on a CPU with bf16 units: auto keeps float32, and redoes nothing
    monkeypatch.setattr(precision, "_this_cpu", lambda: ("amx_bf16",))
    from clipes.label_plan import plan_label

    assert plan_label(cfg, Console(quiet=True)).dtype.reason.startswith("auto: the dtype")
    summary = label_folder(cfg, Console(quiet=True))
    assert summary.skipped == 1 and summary.labelled == 0


# batched post-processing

def _group(seed: int = 0, counts=(2, 0, 1, 3), sizes=((70, 90), (70, 90), (65, 88), (70, 90)), grid=(5, 6)):
    """A size group's CAA inputs: affinities (B, n, n), CAMs in [0, 1] (P, h, w), their boxes, class ids."""
    from clipes.caa import box_mask, sinkhorn_affinity

    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    affinity = sinkhorn_affinity(torch.rand(len(counts), n, n, generator=gen).softmax(-1))
    cams = torch.rand(sum(counts), *grid, generator=gen)
    cams[1] = 0.25  # a flat map: ties everywhere
    ids = torch.randint(0, 20, (sum(counts),), generator=gen)
    return affinity, cams, box_mask(cams, 0.4), ids, list(counts), [tuple(s) for s in sizes]


def test_batched_post_processing_equals_one_image_at_a_time_bit_for_bit():
    from clipes.caa import refine_cams, refine_pairs, upsample, upsample_batch
    from clipes.masks import pseudo_mask, pseudo_masks

    affinity, cams, boxes, ids, counts, sizes = _group()
    starts = np.cumsum([0, *counts])
    image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    low = refine_pairs(affinity, cams, boxes, image)
    assert torch.equal(low, refine_pairs(affinity, cams, boxes, image, budget=1))  # pair by pair
    up = upsample_batch(low, counts, sizes)
    same_size = [i for i, s in enumerate(sizes) if s == sizes[0]]
    masks = pseudo_masks(torch.cat([up[i] for i in same_size]), torch.cat([ids[starts[i]:starts[i + 1]]
                                                                             for i in same_size]),
                         [counts[i] for i in same_size], bg_power=2.0)
    for i, (k, size) in enumerate(zip(counts, sizes, strict=True)):
        span = slice(starts[i], starts[i + 1])
        alone = refine_cams(affinity[i], cams[span], boxes[span])
        assert torch.equal(low[span], alone)
        assert torch.equal(up[i], upsample(alone, size)) and up[i].shape == (k, *size)
        if i in same_size:
            assert torch.equal(masks[same_size.index(i)], pseudo_mask(up[i], ids[span], bg_power=2.0))
    assert not masks[same_size.index(1)].any()  # the image without classes: all background


def test_refine_pairs_is_the_masked_affinity_product():
    from clipes.caa import refine_pairs

    affinity, cams, boxes, _, counts, _ = _group(seed=1)
    image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    out = refine_pairs(affinity, cams, boxes, image).flatten(1)
    for p, i in enumerate(image.tolist()):
        expected = (affinity[i].double() * boxes[p].double()[None, :]) @ cams[p].flatten().double()
        np.testing.assert_allclose(out[p].double(), expected, rtol=1e-6, atol=0)


def test_labeler_group_post_processing_equals_the_per_image_functions(labeler, golden, golden_labels):
    """Through the Labeler, on golden photos of several sizes in one call: each image's refined maps
    and mask are the per-image functions' on its own CAMs and attention, bit for bit."""
    from clipes.caa import box_mask, refine_cams, sinkhorn_affinity, upsample
    from clipes.masks import pseudo_mask

    names = IMAGES[:4]
    results = labeler.label_batch([Image.open(golden / "images" / n) for n in names],
                                  [golden_labels[n] for n in names])
    for res in results:
        cam = torch.from_numpy(res.cam)
        boxes = box_mask(cam, labeler.box_threshold)
        low = refine_cams(sinkhorn_affinity(torch.from_numpy(res.attention)), cam, boxes)
        assert torch.equal(torch.from_numpy(res.box_mask), boxes)
        assert torch.equal(torch.from_numpy(res.cam_refined_lowres), low)
        up = upsample(low, res.mask.shape)
        assert torch.equal(torch.from_numpy(res.cam_refined), up)
        np.testing.assert_array_equal(res.mask, pseudo_mask(up, torch.from_numpy(res.labels)).numpy())
