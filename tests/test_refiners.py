"""Pixel refiners: PAR exact to AFA's code on ../shared/golden/par, its parts, bad inputs, the seam and the CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipes.cli.app import app
from clipes.refiners import REFINERS, CrfRefiner, ParRefiner, RefinerError, make_refiner
from clipes.refiners.par import (
    afa_image,
    afa_masks,
    afa_refine,
    combine_runs,
    denorm_lut,
    neighbours,
    par,
    par_affinity,
    position_softmax,
    propagate,
    upsampled_keys,
    working_size,
)

from .conftest import GOLDEN
from .tolerances import assert_labels_agree

PAR_GOLDEN = GOLDEN / "par"
STEMS = sorted(p.stem for p in PAR_GOLDEN.glob("*.npz")) if PAR_GOLDEN.is_dir() else []
ATOL_AFA, ATOL_SA, RTOL_CHSUM = 1e-5, 5e-5, 1e-5  # the golden README's tolerances
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the golden data was made: PAR's many small operations also run 7x faster on a
    busy two-core machine without threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def par_golden() -> Path:
    if not PAR_GOLDEN.is_dir():
        pytest.skip(f"PAR golden data not found at {PAR_GOLDEN}")
    return PAR_GOLDEN


def _load(stem: str) -> dict[str, np.ndarray]:
    return dict(np.load(PAR_GOLDEN / f"{stem}.npz"))


def _inputs(stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The golden image (H, W, 3) uint8, CLIP-ES's ``cam_refined`` (k, H, W) and its labels."""
    rgb = np.array(Image.open(GOLDEN / "images" / f"{stem}.png").convert("RGB"))
    exp = np.load(GOLDEN / "expected" / f"{stem}.npz")
    return rgb, exp["cam_refined"], exp["labels"]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _check(ref: dict[str, np.ndarray], name: str, full: np.ndarray, atol: float) -> None:
    """A full array against its golden sample grid (``atol``) and per-channel sums (relative 1e-5)."""
    rows, cols = ref[f"{name}_rows"], ref[f"{name}_cols"]
    np.testing.assert_allclose(full[..., rows[:, None], cols[None, :]], ref[name], rtol=0, atol=atol, err_msg=name)
    chsum = full.astype(np.float64).sum(axis=(-2, -1))
    np.testing.assert_allclose(chsum, ref[f"{name}_chsum"], rtol=RTOL_CHSUM, err_msg=f"{name}_chsum")


def _labels_equal(ours: np.ndarray, ref: np.ndarray, tie: np.ndarray, name: str) -> None:
    differ = (ours != ref) & (tie == 0)
    assert not differ.any(), f"{name}: {int(differ.sum())} pixels differ outside the flagged ties"


# ------------------------------------------------------------------------------ golden: PAR alone

def test_par_alone_on_chelsea_arrays(par_golden):
    """PAR on the exact arrays AFA gave it: affinity, one iteration, ten iterations, the position term."""
    ref = _load("chelsea")
    image, masks = torch.from_numpy(ref["afa_image_in_full"]), torch.from_numpy(ref["afa_cams_in_high_full"])
    np.testing.assert_allclose(position_softmax().numpy(), ref["pos_softmax"], rtol=0, atol=1e-7)
    aff = par_affinity(image)
    _check(ref, "afa_high_affinity", aff.numpy(), ATOL_AFA)
    _check(ref, "afa_high_out_iter1", propagate(masks, aff, iterations=1).numpy(), ATOL_AFA)
    np.testing.assert_allclose(par(image, masks).numpy(), ref["afa_out_high_full"], rtol=0, atol=ATOL_AFA)


# ------------------------------------------------------------------------ golden: both settings, every image

@pytest.mark.parametrize("stem", STEMS)
def test_afa_pseudo_labels_match_the_authors(par_golden, stem):
    """Setting "afa": AFA's inputs, PAR at half resolution for both thresholds, labels and pseudo labels."""
    ref = _load(stem)
    rgb, cams, labels = _inputs(stem)
    assert _sha(rgb) == str(ref["image_u8_sha256"])
    np.testing.assert_array_equal(denorm_lut(), ref["denorm_lut"])
    assert _sha(np.stack([denorm_lut()[c][rgb[..., c]] for c in range(3)], axis=-1)) == \
        str(ref["image_denorm_u8_sha256"])
    h, w = rgb.shape[:2]
    assert working_size(h, w) == tuple(ref["afa_size"])
    order = np.argsort(labels)
    keys = torch.from_numpy(np.concatenate([[0], labels[order] + 1]))[None]
    np.testing.assert_array_equal(keys[0].numpy(), ref["afa_keys"])
    rgb_t, cams_t = torch.from_numpy(rgb)[None], torch.from_numpy(cams[order])[None]

    size = working_size(h, w)
    image = torch.nn.functional.interpolate(afa_image(rgb_t), size=size, mode="bilinear", align_corners=False)
    _check(ref, "afa_image_in", image.numpy(), ATOL_AFA)
    _check(ref, "afa_cams_in_high", afa_masks(cams_t, float(ref["bkg_high"]), size).numpy(), ATOL_AFA)
    _check(ref, "afa_cams_in_low", afa_masks(cams_t, float(ref["bkg_low"]), size).numpy(), ATOL_AFA)

    out = afa_refine(rgb_t, cams_t, (float(ref["bkg_high"]), float(ref["bkg_low"])))
    _check(ref, "afa_out_high", out[:, 0].numpy(), ATOL_AFA)
    _check(ref, "afa_out_low", out[:, 1].numpy(), ATOL_AFA)
    high, low = upsampled_keys(out[:, 0], keys, (h, w)), upsampled_keys(out[:, 1], keys, (h, w))
    tie = ref["afa_label_near_tie"]
    _labels_equal(high[0].numpy(), ref["afa_label_high"], tie, "afa_label_high")
    _labels_equal(low[0].numpy(), ref["afa_label_low"], tie, "afa_label_low")
    _labels_equal(combine_runs(high, low)[0].numpy(), ref["afa_pseudo_label"], tie, "afa_pseudo_label")


@pytest.mark.parametrize("stem", STEMS)
def test_standalone_par_matches_the_authors(par_golden, stem):
    """Setting "sa": PAR on the denormalised image and clipes' refined CAMs at full resolution."""
    ref = _load(stem)
    rgb, cams, _ = _inputs(stem)
    masks = torch.from_numpy(cams[None].astype(np.float32))
    assert _sha(masks.numpy()) == str(ref["sa_cams_in_sha256"])
    out = par(afa_image(torch.from_numpy(rgb)[None]), masks, tuple(ref["dilations"]), int(ref["num_iter"]))
    _check(ref, "sa_out", out.numpy(), ATOL_SA)


def test_refiner_batches_images_of_other_sizes_and_class_orders(par_golden):
    """``ParRefiner.refine`` on a group = AFA's labels: coffee (labels unsorted) three times, in a batch of
    two (the pixel budget holds two of its 200 x 300 working sizes) and one of one, and chelsea alone."""
    stems = ["coffee", "chelsea", "coffee", "coffee"]
    inputs = [_inputs(s) for s in stems]
    res = ParRefiner(max_pixels=2 * 200 * 300 + 1).refine([torch.from_numpy(r) for r, _, _ in inputs],
                                                         [torch.from_numpy(c) for _, c, _ in inputs],
                                                         [torch.from_numpy(lab) for _, _, lab in inputs])
    assert list(inputs[0][2]) == [10, 4]  # not ascending: the refiner sorts the channels as AFA's keys are
    for other in (2, 3):  # in a batch of two and alone: the same labels up to float noise (tests/tolerances.py)
        assert_labels_agree(res[0].mask.numpy(), res[other].mask.numpy(), what=f"coffee, copy {other}")
    for stem, r in zip(stems, res, strict=True):
        ref = _load(stem)
        assert r.mask.dtype == torch.uint8 and r.confidence is None
        _labels_equal(r.mask.numpy(), ref["afa_pseudo_label"], ref["afa_label_near_tie"], stem)


# ------------------------------------------------------------------------------ the neighbourhood

def _brute_neighbours(x: np.ndarray, dilations) -> np.ndarray:
    """Neighbour n of (y, x) read with explicit clamped indices, in the reference's order."""
    b, c, h, w = x.shape
    stencil = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    out = np.empty((b, c, 8 * len(dilations), h, w), dtype=x.dtype)
    n = 0
    for d in dilations:
        for dy, dx in stencil:
            for y in range(h):
                for xx in range(w):
                    out[:, :, n, y, xx] = x[:, :, min(max(y + dy * d, 0), h - 1), min(max(xx + dx * d, 0), w - 1)]
            n += 1
    return out


@pytest.mark.parametrize("shape", [(1, 1), (5, 30), (9, 13), (30, 26)])
def test_neighbours_are_the_clamped_dilated_stencil(shape):
    """Exact gather, replicate border, also where the image is narrower than the largest dilation (24)."""
    x = torch.rand(2, 3, *shape)
    np.testing.assert_array_equal(neighbours(x).numpy(), _brute_neighbours(x.numpy(), (1, 2, 4, 8, 12, 24)))


def test_neighbour_order_is_raster_order_per_dilation():
    grid = torch.arange(49.0).view(1, 1, 7, 7)
    centre = neighbours(grid, (1, 2))[0, 0, :, 3, 3].tolist()
    assert centre == [16, 17, 18, 23, 25, 30, 31, 32, 8, 10, 12, 22, 26, 36, 38, 40]


# ------------------------------------------------------------------------------ the position term

def test_position_term_values():
    """The spec's values per ring (axial, diagonal); d = 24's diagonal underflows to exactly 0."""
    p = position_softmax().numpy()
    assert p.shape == (48,) and p.dtype == np.float32
    expected = {1: (0.07645337, 0.06825979), 2: (0.05441286, 0.03457601), 4: (0.01396116, 0.002276222),
                8: (6.050635e-5, 4.275373e-8), 12: (6.970541e-9, 5.674214e-16), 24: (3.75994e-30, 0.0)}
    for ring, (axial, diagonal) in enumerate(expected.values()):
        w = p[8 * ring: 8 * ring + 8]
        np.testing.assert_allclose(w[[1, 3, 4, 6]], axial, rtol=2e-6)
        np.testing.assert_allclose(w[[0, 2, 5, 7]], diagonal, rtol=2e-6)
    assert p[-1] == 0.0
    # an independent float64 computation of the same formula
    dist = np.concatenate([d * np.array([math.sqrt(2), 1, math.sqrt(2), 1, 1, math.sqrt(2), 1, math.sqrt(2)])
                           for d in (1, 2, 4, 8, 12, 24)])
    q = -((dist / (dist.std(ddof=1) + 1e-8)) / 0.3) ** 2
    np.testing.assert_allclose(p, np.exp(q - q.max()) / np.exp(q - q.max()).sum(), rtol=1e-5, atol=1e-12)


def test_affinity_weights_sum_to_one_point_zero_one_and_a_flat_image_gives_uniform_colour_weights():
    aff = par_affinity(torch.rand(1, 3, 17, 11))
    np.testing.assert_allclose(aff.sum(dim=2).numpy(), 1.01, atol=1e-6)
    flat = par_affinity(torch.full((1, 3, 6, 6), 0.5))
    np.testing.assert_allclose(flat[0, 0].numpy(), (1 / 48 + 0.01 * position_softmax()).numpy()[:, None, None]
                               * np.ones((1, 6, 6)), atol=1e-7)


def test_constant_map_grows_by_one_point_zero_one_per_iteration():
    out = par(torch.rand(1, 3, 12, 9), torch.full((1, 2, 12, 9), 0.25))
    np.testing.assert_allclose(out.numpy(), 0.25 * 1.01 ** 10, rtol=1e-5)


def _brute_par(image: np.ndarray, masks: np.ndarray, dilations=(1, 2, 4, 8, 12, 24), iters: int = 10) -> np.ndarray:
    """PAR from the spec in float64 with explicit clamped indices (no flat channels in random images)."""
    g = _brute_neighbours(image, dilations)
    s = g.std(axis=2, ddof=1, keepdims=True)
    k = -(((np.abs(g - image[:, :, None]) / (s + 1e-8)) / 0.3) ** 2)
    k = k.mean(axis=1, keepdims=True)
    e = np.exp(k - k.max(axis=2, keepdims=True))
    pos = position_softmax(dilations).double().numpy()[None, None, :, None, None]
    a = e / e.sum(axis=2, keepdims=True) + 0.01 * pos
    for _ in range(iters):
        masks = (_brute_neighbours(masks, dilations) * a).sum(axis=2)
    return masks


@pytest.mark.parametrize("shape", [(1, 1), (7, 20), (26, 5)])
def test_par_matches_a_brute_force_implementation(shape):
    """Images narrower than the largest dilation, down to 1 x 1 (where every weight is uniform)."""
    g = torch.Generator().manual_seed(0)
    image, masks = torch.rand(1, 3, *shape, generator=g), torch.rand(1, 2, *shape, generator=g)
    expected = _brute_par(image.double().numpy(), masks.double().numpy())
    np.testing.assert_allclose(par(image, masks).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_par_resizes_masks_with_align_corners():
    image, masks = torch.rand(1, 3, 10, 14), torch.rand(1, 2, 5, 7)
    up = torch.nn.functional.interpolate(masks, size=(10, 14), mode="bilinear", align_corners=True)
    np.testing.assert_array_equal(par(image, masks, iterations=2).numpy(), par(image, up, iterations=2).numpy())


# ------------------------------------------------------------------------------ bad inputs through the refiner

@pytest.mark.parametrize(("h", "w", "k"), [(1, 1, 1), (1, 1, 2), (5, 23, 1), (40, 3, 2), (9, 9, 0)])
def test_refiner_takes_tiny_narrow_and_single_class_images(h, w, k):
    g = torch.Generator().manual_seed(h * w + k)
    rgb = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
    cams = torch.rand(k, h, w, generator=g)
    labels = torch.tensor([14, 3][:k], dtype=torch.long)
    mask, conf = ParRefiner().refine_image(rgb.numpy(), cams.numpy(), labels.numpy())
    assert mask.shape == (h, w) and mask.dtype == np.uint8 and conf is None
    assert set(np.unique(mask)) <= {0, 255, *(labels + 1).tolist()}
    if k == 0:
        assert (mask == 0).all()  # the background channel alone wins everywhere


def test_single_class_follows_the_two_thresholds():
    """One class: foreground where it beats the high threshold, 255 between the thresholds, 0 below both.

    Three bands of colour hold the three levels of the CAM, so that PAR keeps them apart.
    """
    cams = np.zeros((1, 40, 40), dtype=np.float32)
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    for c, (band, level) in enumerate(zip((slice(0, 14), slice(14, 27), slice(27, 40)), (0.9, 0.45, 0.1),
                                          strict=True)):
        cams[0, :, band], rgb[:, band, c] = level, 200
    mask, _ = ParRefiner().refine_image(rgb, cams, np.array([7]))
    assert (mask[:, :10] == 8).all() and (mask[:, 17:24] == 255).all() and (mask[:, 31:] == 0).all()


def test_refiner_options_are_checked():
    with pytest.raises(RefinerError, match="--par-bg-low 0.6 is above --par-bg-high 0.55"):
        ParRefiner(bg_low=0.6)
    with pytest.raises(RefinerError, match="--par-bg-high 1.5"):
        ParRefiner(bg_high=1.5)
    with pytest.raises(RefinerError, match="--par-bg-high nan"):
        ParRefiner(bg_high=float("nan"))
    with pytest.raises(RefinerError, match="choose one of crf, par, pamr or none"):
        make_refiner("densecrf")
    with pytest.raises(RefinerError, match="--confidence needs --crf, not --refine par"):
        make_refiner("par", confidence=0.9)
    with pytest.raises(RefinerError, match="--par-bg-low needs --refine par"):
        make_refiner(None, bg_low=0.3)
    assert make_refiner("none") is None and make_refiner(None, confidence=None) is None
    assert make_refiner("par", bg_high=0.6).settings()["bg_high"] == 0.6
    assert set(REFINERS) == {"crf", "par", "pamr"}
    with pytest.raises(RefinerError, match="--par-iterations -1"):
        ParRefiner(iterations=-1)
    with pytest.raises(RefinerError, match="--par-iterations needs --refine par"):
        make_refiner("crf", iterations=3)


def test_par_iterations_follow_the_class_set():
    """AFA runs PAR 15 times for COCO (dist_train_coco.py) and 10 for VOC; --par-iterations chooses."""
    from dataclasses import replace

    from clipes.prompts import load_class_set
    from clipes.run import LabelConfig, _refiner

    cfg = LabelConfig(images=None, out=Path("unused"), refine="par", device="cpu")
    assert _refiner(cfg, load_class_set("coco")).iterations == 15
    assert _refiner(cfg, load_class_set("voc")).iterations == 10
    assert _refiner(replace(cfg, par_iterations=3), load_class_set("coco")).settings()["iterations"] == 3
    assert _refiner(replace(cfg, refine=None), load_class_set("coco")) is None


def test_crf_refiner_is_the_crf(golden):
    """The CRF behind the seam gives ``crf_labels``' numbers, one image or a group."""
    pytest.importorskip("pydensecrf")
    from clipes.crf import crf_labels

    rgb, cams, labels = _inputs("coffee")
    rgb, cams = rgb[::4, ::4].copy(), cams[:, ::4, ::4].copy()
    refiner = make_refiner("crf", confidence=0.95)
    assert isinstance(refiner, CrfRefiner)
    mask, conf = crf_labels(rgb, cams, labels, 2.0, 0.95)
    res = refiner.refine([torch.from_numpy(rgb)], [torch.from_numpy(cams)], [torch.from_numpy(labels)], 2.0)[0]
    np.testing.assert_array_equal(res.mask.numpy(), mask)
    np.testing.assert_array_equal(res.confidence.numpy(), conf)


# ------------------------------------------------------------------------------ the command line

def test_cli_label_refine_par_masks_train(golden, tmp_path):
    """``clipes label --refine par`` writes AFA's pseudo labels of the saved refined CAMs; they train."""
    images = tmp_path / "images"
    images.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((120, 80)).save(images / "chelsea.png")
    Image.open(golden / "images" / "coffee.png").resize((96, 72)).save(images / "coffee.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    out = tmp_path / "out"
    base = ["label", str(images), "--labels", str(labels), "--model", str(golden / "tiny-clip-vit-b16-random.pt"),
            "--device", "cpu", "--workers", "0", "--out", str(out)]
    res = runner.invoke(app, [*base, "--refine", "par", "--par-bg-low", "0.3", "--save-cams"])
    assert res.exit_code == 0, res.output
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["refiner"] == {"name": "par", "bg_high": 0.55, "bg_low": 0.3, "dilations": [1, 2, 4, 8, 12, 24],
                                   "iterations": 10}
    for stem in ("chelsea", "coffee"):
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        cams = np.load(out / "cams" / f"{stem}.npz")
        assert "confidence" not in cams.files
        rgb = np.asarray(Image.open(images / f"{stem}.png").convert("RGB"))
        expected, _ = ParRefiner(bg_low=0.3).refine_image(rgb, cams["cam_refined"], cams["labels"])
        np.testing.assert_array_equal(mask, expected)
        assert set(np.unique(mask)) <= {0, 255, *(cams["labels"] + 1).tolist()}

    res = runner.invoke(app, [*base, "--crf"])  # another refiner into the same folder is refused
    assert res.exit_code == 2 and "other settings (refiner)" in res.output
    res = runner.invoke(app, [*base, "--crf", "--refine", "par"])
    assert res.exit_code == 2 and "--crf is --refine crf" in res.output
    res = runner.invoke(app, [*base, "--refine", "densecrf"])
    assert res.exit_code == 2 and "'densecrf': choose one of crf, par, pamr or none" in res.output
    res = runner.invoke(app, [*base, "--refine", "par", "--confidence", "0.9"])
    assert res.exit_code == 2 and "--confidence needs --crf, not --refine par" in res.output

    seg = tmp_path / "seg"
    res = runner.invoke(app, ["train-seg", "--images", str(images), "--masks", str(out / "masks"), "--model", "tiny",
                              "--steps", "2", "--batch-size", "2", "--crop", "32", "--workers", "0", "--device", "cpu",
                              "--val-every", "100", "--out", str(seg)])
    assert res.exit_code == 0, res.output
    assert (seg / "last.pt").is_file()
