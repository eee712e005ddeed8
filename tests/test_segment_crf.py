"""``clipes segment --crf``: deeplab-pytorch's test-time CRF on both backends, and ``--ignore-exif``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.segment.crf import crf_probabilities, softmax_unary

from .synthetic import make_dataset

runner = CliRunner()
STEMS = ("2007_000033", "2009_000573", "2010_001069")


def _probs(golden: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """A photo (halved, to keep the CRF quick) and a segmenter-like softmax: its ground truth blurred by noise."""
    rgb = Image.open(golden / "images" / f"{stem}.png").convert("RGB")
    gt = Image.open(golden / "gt" / f"{stem}.png")
    size = (rgb.width // 2, rgb.height // 2)
    rgb, gt = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)), np.asarray(gt.resize(size))
    rng = np.random.default_rng(0)
    labels = np.where(gt == 255, 0, gt).astype(np.int64)
    logits = rng.normal(0, 1.5, (21, *labels.shape)).astype(np.float32)
    logits[labels, np.arange(labels.shape[0])[:, None], np.arange(labels.shape[1])] += 2.0
    probs = torch.from_numpy(logits).softmax(0).numpy()
    return rgb, probs


def _deeplab_pytorch_crf(rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """deeplab-pytorch's ``main.py crf`` written out: the mean-subtracted BGR image cast to uint8, the unary of
    pydensecrf.utils.unary_from_softmax, and configs/voc12.yaml's CRF settings."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    bgr = rgb[..., ::-1].astype(np.float32) - np.array([104.008, 116.669, 122.675], np.float32)
    image = np.ascontiguousarray(bgr.astype(np.int16).astype(np.uint8))  # the float -> uint8 cast, wrapped
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    return np.array(d.inference(10)).reshape(c, h, w)


@pytest.fixture(scope="module")
def cases(golden):
    pytest.importorskip("pydensecrf.densecrf")
    return [(_probs(golden, s), _deeplab_pytorch_crf(*_probs(golden, s))) for s in STEMS]


def test_unary_is_unary_from_softmax(cases):
    from pydensecrf.utils import unary_from_softmax

    for (_, probs), _ in cases:
        # torch's and numpy's float32 log may differ in the last place
        np.testing.assert_allclose(softmax_unary(torch.from_numpy(probs)).numpy(), unary_from_softmax(probs),
                                   rtol=1e-6, atol=1e-6)


def test_pydensecrf_backend_is_deeplab_pytorch_crf(cases):
    for (rgb, probs), expected in cases:
        q = crf_probabilities(rgb, torch.from_numpy(probs), "pydensecrf").numpy()
        np.testing.assert_allclose(q, expected, atol=1e-4)  # same CRF; the unaries differ by an ulp at most
        assert (q.argmax(0) == expected.argmax(0)).mean() >= 0.9999
        assert (q.argmax(0) != probs.argmax(0)).mean() > 0.05  # the CRF did change the labels


def test_torch_backend_matches_pydensecrf(cases):
    agree, total = 0, 0
    for (rgb, probs), expected in cases:
        q = crf_probabilities(rgb, torch.from_numpy(probs), "torch").numpy()
        same = q.argmax(0) == expected.argmax(0)
        assert same.mean() >= 0.999, same.mean()
        agree, total = agree + same.sum(), total + same.size
    assert agree / total >= 0.999


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crf")
    data = make_dataset(root / "data", n_train=8, n_val=2, size=32)
    res = runner.invoke(app, ["train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"),
                              "--classes", str(data / "classes.txt"), "--model", "tiny", "--steps", "2",
                              "--batch-size", "2", "--crop", "32", "--workers", "0", "--device", "cpu",
                              "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    return data, root / "run" / "last.pt"


def _segment(images: Path, ckpt: Path, out: Path, *extra: str):
    return runner.invoke(app, ["segment", str(images), "--checkpoint", str(ckpt), "--out", str(out), "--device",
                               "cpu", *extra])


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_segment_crf_end_to_end(trained, tmp_path, backend):
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf")
    data, ckpt = trained
    res = _segment(data / "val_images", ckpt, tmp_path / "crf", "--crf", "--crf-backend", backend)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "crf" / "segment.json").read_text())
    assert record["settings"]["crf"] == {"backend": backend, "iterations": 10, "gaussian_sxy": 1, "gaussian_compat": 3,
                                         "bilateral_sxy": 67, "bilateral_srgb": 3, "bilateral_compat": 4}
    assert len(list((tmp_path / "crf").glob("*.png"))) == 2
    res = _segment(data / "val_images", ckpt, tmp_path / "crf")  # the same folder without the CRF: refused
    assert res.exit_code != 0 and "other settings" in res.output and "crf" in res.output


def test_crf_backend_needs_crf(trained, tmp_path):
    data, ckpt = trained
    res = _segment(data / "val_images", ckpt, tmp_path / "x", "--crf-backend", "torch")
    assert res.exit_code != 0 and "--crf-backend needs --crf" in res.output


def test_segment_ignore_exif_keeps_the_stored_pixels(trained, tmp_path):
    _, ckpt = trained
    images = tmp_path / "photos"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(images / "p.jpg", exif=exif.tobytes())
    assert _segment(images, ckpt, tmp_path / "turned").exit_code == 0
    assert Image.open(tmp_path / "turned" / "p.png").size == (24, 40)  # EXIF applied (the default)
    res = _segment(images, ckpt, tmp_path / "stored", "--ignore-exif")
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "stored" / "p.png").size == (40, 24)
    assert json.loads((tmp_path / "stored" / "segment.json").read_text())["settings"]["ignore_exif"] is True


def test_segment_split_file_takes_only_the_listed_images(trained, tmp_path):
    data, ckpt = trained
    stems = sorted(p.stem for p in (data / "val_images").iterdir())
    listed = tmp_path / "val.txt"
    listed.write_text(f"{stems[1]}\n")
    res = _segment(data / "val_images", ckpt, tmp_path / "one", "--split-file", str(listed))
    assert res.exit_code == 0, res.output
    assert [p.stem for p in (tmp_path / "one").glob("*.png")] == [stems[1]]
    listed.write_text(f"{stems[0]}\nnot_an_image\n")
    res = _segment(data / "val_images", ckpt, tmp_path / "two", "--split-file", str(listed))
    assert res.exit_code != 0 and "not_an_image" in res.output and not (tmp_path / "two").exists()
