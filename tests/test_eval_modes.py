"""The reference's evaluation modes (issue 10): a constant background threshold beside the power, and the
background power inside the dense CRF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipes.cli import app
from clipes.masks import mask_to_png, threshold_mask
from clipes.refiners.crf import crf_unary

from .test_cli import _label, _labels_file, images, runner  # noqa: F401 - the fixture is used by name


def _reference_threshold_mask(cams: np.ndarray, keys: np.ndarray, thr: float) -> np.ndarray:
    """eval_cam.py with cam_eval_thres < 1: pad a constant background channel, argmax, map to keys."""
    padded = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
    return np.pad(keys + 1, (1, 0), mode="constant")[np.argmax(padded, axis=0)].astype(np.uint8)


def test_threshold_mask_is_the_references_constant_background():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 20, 30)).astype(np.float32)
    cams[:, 0, :4] = 0.25  # ties with the threshold go to the background, as np.argmax keeps the first
    keys = np.array([4, 0, 17])
    for thr in (0.05, 0.25, 0.5, 0.95):
        got = threshold_mask(torch.from_numpy(cams), torch.from_numpy(keys), thr).numpy()
        np.testing.assert_array_equal(got, _reference_threshold_mask(cams, keys, thr))
    assert (threshold_mask(torch.from_numpy(cams), torch.from_numpy(keys), 0.25).numpy()[0, :4] == 0).all()
    assert not threshold_mask(torch.zeros(0, 4, 5), torch.zeros(0, dtype=torch.long), 0.3).any()


def test_eval_searches_a_background_threshold(tmp_path, images, golden):  # noqa: F811
    out = tmp_path / "out"
    res = _label(images, out, "--labels", str(_labels_file(tmp_path)), "--save-cams",
                 model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 0, res.output
    # ground truth: the masks the reference's threshold mode makes at 0.3, so 0.3 must win with mIoU 1
    gt = tmp_path / "gt"
    for npz in (out / "cams").rglob("*.npz"):
        with np.load(npz) as d:
            mask = _reference_threshold_mask(d["cam_refined"], d["labels"], 0.3)
        target = gt / npz.relative_to(out / "cams").with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(mask).save(target)
    res = runner.invoke(app, ["eval", str(out), str(gt), "--search-bg-threshold", "0.1,0.3,0.6",
                              "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["bg_threshold"] == 0.3 and report["miou"] == pytest.approx(1.0)
    assert set(report["bg_threshold_search"]) == {"0.1", "0.3", "0.6"} and report["images"] == 4
    assert "background threshold search" in res.output


@pytest.mark.parametrize(("args", "expect"), [
    (["--search-bg-threshold", "0.2", "--search-bg-power", "1"], "give one"),
    (["--search-bg-threshold", "0.2,1.5"], "each in (0, 1)"),
    (["--search-bg-threshold", "0.2,x"], "is not a number"),
])
def test_bad_background_searches_are_refused(tmp_path, args, expect):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "gt" / "a.png")
    res = runner.invoke(app, ["eval", str(tmp_path / "pred"), str(tmp_path / "gt"), *args])
    assert res.exit_code == 2 and expect in " ".join(res.output.split()) and "Traceback" not in res.output


def test_the_crf_unary_takes_the_runs_background_power():
    """clipes applies --bg-power inside the CRF too (the reference always uses t = 1 there): at the default
    t = 1 the unary is the reference's; at t = 2 its background row is -log((1 - max)^2)."""
    rng = np.random.default_rng(1)
    cams = rng.random((2, 6, 7)).astype(np.float32)
    c16 = cams.astype(np.float16)
    bg1 = np.clip(1 - c16.max(0), np.float16(1e-5), np.float16(1)).reshape(-1)
    np.testing.assert_array_equal(crf_unary(cams)[0], (-np.log(bg1)).astype(np.float32))
    bg2 = np.clip(np.power(1 - c16.max(0), np.float16(2)), np.float16(1e-5), np.float16(1)).reshape(-1)
    np.testing.assert_array_equal(crf_unary(cams, 2.0)[0], (-np.log(bg2)).astype(np.float32))
    np.testing.assert_array_equal(crf_unary(cams, 2.0)[1:], crf_unary(cams)[1:])  # the classes are untouched
    assert not np.array_equal(crf_unary(cams, 2.0)[0], crf_unary(cams)[0])
