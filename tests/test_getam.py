"""GETAM parity with the authors' ``generate_cam_2`` on ../shared/golden/getam (fp32, CPU).

Tolerances are the issue's: the raw maps within 1e-5 of each map's maximum, the normalised map
(``cam_lowres``) within 1e-5, the pseudo masks at t = 1 and t = 2 on at least 99.9% of pixels.

The golden forward differs from clipes' in two places, both outside GETAM, and the tests run clipes
under the golden's conditions so that they measure the CAM method:

- The positional embedding. The golden data were made with the authors' CLIP-ES model code, which
  rounds the interpolated positional embedding to fp16 (``clipes-reference.md`` section 1); the
  CLIP-ES golden data and clipes keep it fp32. GETAM's maps are sensitive to it: with the fp32
  embedding they differ from the golden by up to 1.8e-4 of the maximum (measured in float64 as in
  float32, so it is no rounding noise of either side); with it rounded to fp16, by at most 9e-6.
- The text features. The golden's are ``expected/text_features.npz``; clipes' own differ from them
  by 3.4e-7 (float32 rounding in the text tower, checked by ``test_parity.test_text_features``). The
  maps of these random weights amplify that ~30-fold (measured: up to 9e-6 of the maximum with
  clipes' text features, 2.4e-6 with the golden's, and 1.8e-6 in float64), so the tests take the
  golden's to keep the 1e-5 bound meaningful on any CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipes import Labeler, vit
from clipes.cams import Getam, getam_maps
from clipes.masks import pseudo_mask

from .conftest import GOLDEN

IMAGES = sorted(p.name for p in (GOLDEN / "images").glob("*.png")) if GOLDEN.is_dir() else []
REL = 1e-5


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "getam" / f"{Path(name).stem}.npz"))


def _fp16_pos_embed(pos: torch.Tensor, grid: tuple[int, int],
                    interpolate=vit.interpolate_pos_embed) -> torch.Tensor:
    return interpolate(pos, grid).half().to(pos.dtype)


def _golden_labeler(tiny_clip, voc, golden: Path, **kwargs) -> Labeler:
    labeler = Labeler(tiny_clip, voc, **kwargs)
    ref = np.load(golden / "expected" / "text_features.npz")
    labeler.text = dataclasses.replace(labeler.text, fg=torch.from_numpy(ref["fg"]), bg=torch.from_numpy(ref["bg"]))
    return labeler


@pytest.fixture(scope="module")
def golden_runs(tiny_clip, voc, golden, golden_labels):
    """Per image: the raw maps of start 0 and 6 (``getam_maps``) and the Labeler's result (start 6)."""
    labeler = _golden_labeler(tiny_clip, voc, golden, cam="getam")
    visual = tiny_clip.visual
    out = {}
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(vit, "interpolate_pos_embed", _fp16_pos_embed)
        for name in IMAGES:
            p = labeler.prepare(Image.open(golden / "images" / name), golden_labels[name])
            images = p.tensor[None]
            grid = (images.shape[-2] // 16, images.shape[-1] // 16)
            pairs = labeler._pairs([p.labels])
            raw = {}
            for start in (0, 6):
                tokens, _ = vit.encode_trunk(visual, images, stop=start)
                raw[start] = getam_maps(visual, tokens, pairs, labeler.logit_scale, grid, start)[0].numpy()
            out[name] = (raw, labeler.label_prepared([p])[0])
    return out


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("start", [0, 6])
def test_raw_maps_match_generate_cam_2(golden_runs, name, start):
    ref = reference(name)[f"getam_start{start}"]
    ours = golden_runs[name][0][start]
    assert ours.shape == ref.shape
    top = ref.reshape(len(ref), -1).max(axis=1)
    assert (top > 0).all()
    err = np.abs(ours - ref).reshape(len(ref), -1).max(axis=1)
    assert (err <= REL * top).all(), f"max error / map maximum: {err / top}"


@pytest.mark.parametrize("name", IMAGES)
def test_labeler_matches_the_reference_pipeline(golden_runs, name):
    ref, res = reference(name), golden_runs[name][1]
    np.testing.assert_array_equal(res.labels, ref["labels"])
    assert res.input_size == (int(ref["input_height"]), int(ref["input_width"]))
    assert res.mask.shape == (int(ref["height"]), int(ref["width"]))
    np.testing.assert_allclose(res.probs[None], ref["probs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.cam, ref["cam_lowres"], rtol=0, atol=REL)
    for power in (1, 2):
        mask = pseudo_mask(torch.from_numpy(res.cam_refined), torch.from_numpy(res.labels), power).numpy()
        agree = float((mask == ref[f"pseudo_mask_t{power}"]).mean())
        assert agree >= 0.999, f"t={power}: {agree:.5f}"
        if power == 1:
            np.testing.assert_array_equal(res.mask, mask)


def test_the_last_block_adds_nothing(tiny_clip, voc, golden, golden_labels):
    """The target pools the patch tokens, so the last block's CLS row has no gradient: a map from the
    last block alone is zero, and its normalised map stays zero (no division by zero)."""
    labeler = Labeler(tiny_clip, voc, cam=Getam(start=11))
    res = labeler.label(Image.open(golden / "images" / "coffee.png"), golden_labels["coffee.png"])
    assert res.cam.shape[0] == 2 and not res.cam.any() and np.isfinite(res.cam_refined).all()
    assert not res.box_mask.any()


@pytest.fixture(scope="module")
def same_size(golden, golden_labels):
    """Four golden photos at one size (one size group), with one or two classes each."""
    names = ["coffee.png", "chelsea.png", "2009_000573.png", "2007_000033.png"]
    images = [Image.open(golden / "images" / n).convert("RGB").resize((112, 80)) for n in names]
    return images, [golden_labels[n] for n in names]


@pytest.mark.parametrize("start", [0, 6])
def test_batched_equals_one_image_and_one_pair_at_a_time(tiny_clip, voc, same_size, start):
    """A size group in one pass gives each image what it gets alone and what one backward per class gives.

    The batch runs the same kernels on a larger leading dimension, so results agree to float32
    rounding, not bit for bit: measured 1.4e-6 for the normalised maps (asserted 1e-5) and 3e-7 for
    the refined maps before their min-max normalisation (asserted 1e-6). The masks are not compared:
    on these random weights a refined map can span 4e-5 around 0.28 (coffee's diningtable, start 0),
    so min-max normalisation turns 1e-7 of rounding into 3e-3 and flips pixels (0.1% there).
    """
    images, labels = same_size
    batched = Labeler(tiny_clip, voc, cam=Getam(start), keep_attention=True).label_batch(images, labels)
    single = Labeler(tiny_clip, voc, cam=Getam(start), keep_attention=True)
    per_pair = Labeler(tiny_clip, voc, cam=Getam(start, per_pair=True), keep_attention=True).label_batch(images,
                                                                                                         labels)
    for img, lab, res, slow in zip(images, labels, batched, per_pair, strict=True):
        alone = single.label(img, lab)
        for other in (alone, slow):
            np.testing.assert_array_equal(res.labels, other.labels)
            np.testing.assert_allclose(res.cam, other.cam, rtol=0, atol=1e-5)
            np.testing.assert_allclose(res.probs, other.probs, rtol=0, atol=1e-6)
            np.testing.assert_allclose(res.attention, other.attention, rtol=0, atol=1e-6)
            np.testing.assert_allclose(res.cam_refined_lowres, other.cam_refined_lowres, rtol=0, atol=1e-6)
