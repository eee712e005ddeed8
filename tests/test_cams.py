"""The CAM-method seam: registry, the trunk it starts from, and ``--cam`` through every command that makes masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clipes.prompt_selection as ps
from clipes import Labeler, load_class_set
from clipes.cams import CAMS, CamError, ClearClip, Getam, GradCam, MaskClip, Naclip, Sclip, make_cam
from clipes.evaluate import confusion, read_label_png, scores
from clipes.images import read_image
from clipes.refiners import ParRefiner
from clipes.vit import block_forward, embed, encode_trunk

from .test_batching import _masks
from .test_cli import _label, _labels_file, _tree_digest, images  # noqa: F401
from .test_prompt_selection import FEW, _rank, fast_model, small  # noqa: F401


def test_registry_names_and_options():
    assert dict(CAMS) == {"gradcam": GradCam, "getam": Getam, "maskclip": MaskClip, "sclip": Sclip,
                          "clearclip": ClearClip, "naclip": Naclip}
    assert make_cam("getam").settings() == {"name": "getam", "start": 6}
    assert make_cam("getam", start=0, per_pair=True).per_pair
    assert make_cam("gradcam", start=None).settings() == {"name": "gradcam"}
    with pytest.raises(CamError, match="--cam 'gradcm': choose one of gradcam, getam"):
        make_cam("gradcm")
    with pytest.raises(CamError, match="--getam-start needs --cam getam, not --cam gradcam"):
        make_cam("gradcam", start=3)
    with pytest.raises(CamError, match="--getam-start -1"):
        Getam(-1)
    with pytest.raises(CamError, match="has 12 blocks, numbered 0 to 11"):
        Getam(12).first_block(12)
    assert Getam(11).first_block(12) == 11 and GradCam().first_block(12) == 11


def test_labeler_takes_a_method_by_name_or_object(tiny_clip, voc):
    assert isinstance(Labeler(tiny_clip, voc).cam, GradCam)
    assert Labeler(tiny_clip, voc, cam="getam", per_pair_backward=True).cam.per_pair
    assert Labeler(tiny_clip, voc, cam=Getam(0)).cam.start == 0
    with pytest.raises(ValueError, match="per_pair"):
        Labeler(tiny_clip, voc, cam=Getam(), per_pair_backward=True)
    with pytest.raises(CamError, match="--getam-start 12"):
        Labeler(tiny_clip, voc, cam=Getam(12))


@pytest.mark.parametrize("stop", [0, 3, 6, 11])
def test_encode_trunk_stops_before_the_block_asked(tiny_clip, stop):
    """The tokens entering block ``stop``, and the attention of the CAA blocks (the last 8) before it.

    The reference here computes every block's attention explicitly; the trunk may run fused attention
    where CAA needs no weights, so tokens (magnitude ~3) agree to float32 rounding (1.2e-6 measured).
    """
    visual = tiny_clip.visual
    batch = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        tokens, attn = encode_trunk(visual, batch, attn_blocks=8, stop=stop)
        x, maps = embed(visual, batch), []
        for block in visual.transformer.resblocks[:stop]:
            x, w = block_forward(block, x, need_weights=True)
            maps.append(w[:, 1:, 1:])
    np.testing.assert_allclose(tokens, x, rtol=0, atol=1e-5)
    expected = sum(maps[4:], torch.zeros(2, 12, 12))
    np.testing.assert_allclose(attn, expected, rtol=0, atol=1e-6)


def test_zero_shot_labels_with_getam_are_those_of_gradcam(tiny_clip, voc, golden):
    """GETAM's trunk stops before the last block, so the tagger runs its own forward: same tags."""
    image = Image.open(golden / "images" / "chelsea.png")
    a = Labeler(tiny_clip, voc).label(image)
    b = Labeler(tiny_clip, voc, cam="getam").label(image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.scores == b.scores and a.label_source == b.label_source == "zero-shot"


def test_getam_with_a_pixel_refiner(tiny_clip, voc, golden, golden_labels):
    """PAR takes GETAM's refined maps as it takes GradCAM's."""
    image = Image.open(golden / "images" / "coffee.png")
    labels = golden_labels["coffee.png"]
    res = Labeler(tiny_clip, voc, cam="getam", refiner=ParRefiner()).label(image, labels)
    plain = Labeler(tiny_clip, voc, cam="getam").label(image, labels)
    np.testing.assert_array_equal(res.cam_refined, plain.cam_refined)
    mask, _ = ParRefiner().refine_image(np.asarray(image.convert("RGB")), plain.cam_refined, plain.labels)
    np.testing.assert_array_equal(res.mask, mask)


def test_cli_getam_run_records_its_method_and_refuses_another(tmp_path, images, golden, tiny_clip, voc):  # noqa: F811
    model = golden / "tiny-clip-vit-b16-random.pt"
    out = tmp_path / "out"
    labels = str(_labels_file(tmp_path))
    res = _label(images, out, "--labels", labels, "--cam", "getam", "--save-cams", model=model)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["cam"] == {"name": "getam", "start": 6}
    assert manifest["options"]["cam"] == "getam"
    cams = np.load(out / "cams" / "sub" / "coffee.npz")  # the normalised map, as the boxes and CAA take it
    mine = Labeler(tiny_clip, voc, cam="getam").label(Image.open(images / "sub" / "coffee.png"),
                                                      ["diningtable", "bottle"])
    np.testing.assert_allclose(cams["cam"], mine.cam, rtol=0, atol=1e-6)
    assert cams["cam"].max() == pytest.approx(1.0)

    before = _tree_digest(out)
    for extra, what in ((["--cam", "gradcam"], "(cam)"), (["--cam", "getam", "--getam-start", "0"], "(cam)")):
        res = _label(images, out, "--labels", labels, *extra, model=model)
        assert res.exit_code == 2 and what in res.output and "--overwrite" in res.output, res.output
    assert _tree_digest(out) == before
    res = _label(images, out, "--labels", labels, "--cam", "getam", "--getam-start", "6", model=model)
    assert res.exit_code == 0 and "4 already done" in res.output, res.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--cam", "gradcm"], "'gradcm': choose one of gradcam, getam"),
    (["--getam-start", "3"], "--getam-start needs --cam getam, not --cam gradcam"),
    (["--cam", "getam", "--getam-start", "-1"], "-1 is not >= 0"),
    (["--cam", "getam", "--getam-start", "12"], "has 12 blocks, numbered 0 to 11"),
])
def test_bad_cam_options_are_refused_before_anything_is_written(tmp_path, images, golden, extra, message):  # noqa: F811
    out = tmp_path / "out"
    res = _label(images, out, "--labels", str(_labels_file(tmp_path)), *extra,
                 model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists()


def test_cli_getam_with_par(tmp_path, images, golden):  # noqa: F811
    out = tmp_path / "out"
    res = _label(images, out, "--labels", str(_labels_file(tmp_path)), "--cam", "getam", "--getam-start", "0",
                 "--refine", "par", model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 0, res.output
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["cam"] == {"name": "getam", "start": 0} and settings["refiner"]["name"] == "par"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_getam_under_torchrun_writes_what_one_process_writes(tmp_path, images, golden):  # noqa: F811
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["label", str(images), "--labels", str(_labels_file(tmp_path)), "--model", model, "--device", "cpu",
              "--workers", "0", "--cam", "getam"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "clipes", *common, "--out", str(single)], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29537", "-m", "clipes", *common, "--out", str(multi)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = _masks(single), _masks(multi)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:  # the same engine on other batches: float rounding may flip a near-flat pixel
        assert (a[k] == b[k]).mean() >= 0.999, k
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["settings"]["cam"] == {"name": "getam", "start": 6}


def test_prompts_rank_validates_with_the_cam_asked(tmp_path, small, fast_model):  # noqa: F811
    """``prompts rank --validate --cam getam`` scores the masks ``Labeler(cam="getam")`` makes."""
    templates = tmp_path / "t.txt"
    templates.write_text("\n".join(FEW[:2]) + "\n")
    out = tmp_path / "r.json"
    res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(out), "--gt", str(small / "gt"),
                "--validate", "1", "--cam", "getam", "--getam-start", "0")
    assert res.exit_code == 0, res.output
    best = json.loads(out.read_text())[0]
    labels = json.loads((small / "labels.json").read_text())
    voc = load_class_set("voc")
    labeler = Labeler(fast_model, ps.with_template(voc, best["template"]), max_side=1024, cam=Getam(0))
    hist = sum(confusion(labeler.label(read_image(small / "images" / f"{s}.png"), labels[f"{s}.png"]).mask,
                         read_label_png(small / "gt" / f"{s}.png"), len(voc) + 1)
               for s in ("2009_000573", "2007_000033"))
    assert best["miou"] == pytest.approx(scores(hist).miou, abs=1e-12)
    res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(out), "--gt", str(small / "gt"),
                "--getam-start", "0")
    assert res.exit_code == 2 and "--getam-start needs --cam getam" in res.output
