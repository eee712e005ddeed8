"""TagCLIP against the authors' intermediates (../shared/golden/tagclip), its pieces, and its commands.

Tolerances are the issue's: 1e-4 on scores and intermediates, exact label sets, exact integer
thresholds, boxes, crops and CLS masks. The voted attention is compared by the share of equal
entries: a vote sits on a knife edge (an entry equal to its block's mean up to float32 rounding),
and one flipped entry of a million moves attention by ~1e-3 there while scores stay equal to 1e-8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from clipes import Labeler, load_class_set
from clipes.cli import app
from clipes.images import preprocess
from clipes.labels import read_labels
from clipes.prompts import ClassSetError
from clipes.tagging import GlobalTagger, TagCLIP, TaggerError, make_tagger
from clipes.tagging.metrics import average_precision, overall_f1, tag_metrics
from clipes.tagging.tagclip import component_box_mask, relative_labels, tagclip_names, tagclip_templates

from .conftest import GOLDEN

ATOL = 1e-4
TAGCLIP = GOLDEN / "tagclip"
STEMS = sorted(p.stem for p in TAGCLIP.glob("*.npz") if p.stem != "text_features_tagclip") if TAGCLIP.is_dir() \
    else []
runner = CliRunner()


@pytest.fixture(scope="module")
def tagclip(tiny_clip, voc) -> TagCLIP:
    if not TAGCLIP.is_dir():
        pytest.skip(f"TagCLIP golden data not found at {TAGCLIP}")
    return TagCLIP(tiny_clip, voc)


@pytest.fixture(scope="module")
def outputs(tagclip) -> dict[str, tuple]:
    """Every golden image through ``TagCLIP.run``, images of one size in one batch: (output, index)."""
    by_size: dict[tuple, list[str]] = {}
    tensors = {}
    for stem in STEMS:
        tensors[stem] = preprocess(Image.open(GOLDEN / "images" / f"{stem}.png"), 16)
        by_size.setdefault(tuple(tensors[stem].shape), []).append(stem)
    out = {}
    for stems in by_size.values():
        res = tagclip.run(torch.stack([tensors[s] for s in stems]))
        out.update({s: (res, i) for i, s in enumerate(stems)})
    assert any(len(s) > 1 for s in by_size.values())  # batching is exercised
    return out


def golden(stem: str) -> dict[str, np.ndarray]:
    return dict(np.load(TAGCLIP / f"{stem}.npz"))


def test_text_features_match_the_authors(tagclip):
    ref = np.load(TAGCLIP / "text_features_tagclip.npz")
    assert tagclip.names == list(ref["class_names"]) and tagclip.num_fg == int(ref["num_fg"])
    assert list(tagclip_templates()) == list(ref["templates"])
    assert float(tagclip.logit_scale) == pytest.approx(float(ref["logit_scale"]), abs=1e-6)
    np.testing.assert_allclose(tagclip.text.numpy(), ref["text_features"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("stem", STEMS)
def test_scores_and_labels_match_the_authors(outputs, stem):
    (res, i), ref = outputs[stem], golden(stem)
    assert (res.image_features.shape[1] - 1, res.logits_coarse.shape[2]) == (int(ref["grid_h"] * ref["grid_w"]),
                                                                             45)
    np.testing.assert_allclose(res.logits_max_before_cwr[i].numpy(), ref["logits_max_before_cwr"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.logits_max[i].numpy(), ref["logits_max"], rtol=0, atol=ATOL)
    assert res.labels[i] == ref["labels"].tolist()


@pytest.mark.parametrize("stem", STEMS)
def test_box_refinement_matches_the_authors(outputs, stem):
    (res, i), ref = outputs[stem], golden(stem)
    gh, gw = int(ref["grid_h"]), int(ref["grid_w"])
    np.testing.assert_allclose(res.boxes.mean[i].numpy(), ref["mask_attn_threshold"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(res.boxes.threshold[i].numpy(), ref["mask_attn_thresh_int"])
    expected = np.zeros((45, gh, gw), dtype=bool)  # the union of the authors' boxes, sliced as they slice
    for c, x0, y0, x1, y1 in ref["mask_attn_boxes"]:
        expected[c, y0:y1, x0:x1] = True
    np.testing.assert_array_equal(res.boxes.box_mask[i].T.reshape(45, gh, gw).numpy(), expected)


@pytest.mark.parametrize("stem", STEMS)
def test_reidentification_matches_the_authors(outputs, stem):
    (res, i), ref = outputs[stem], golden(stem)
    crops = res.crops
    assert float(crops.threshold[i]) == pytest.approx(float(ref["cwr_thres"]), abs=ATOL)
    assert crops.candidates[i] == ref["cwr_candidates"].tolist()
    assert crops.early_return[i] == int(ref["cwr_early_return_class"])
    processed = crops.candidates[i][: len(crops.boxes[i])]
    assert [[c, *box] for c, box in zip(processed, crops.boxes[i], strict=True)] == ref["cwr_boxes"].tolist()
    np.testing.assert_array_equal(res.cwr_keep[i].numpy(), ref["cwr_keep"])
    np.testing.assert_allclose(res.cwr_probs[i].numpy(), ref["cwr_probs"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("stem", [s for s in STEMS if "image_features" in np.load(TAGCLIP / f"{s}.npz")])
def test_patch_level_intermediates_match_the_authors(outputs, stem):
    (res, i), ref = outputs[stem], golden(stem)
    np.testing.assert_allclose(res.image_features[i].numpy(), ref["image_features"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.logits_coarse[i].numpy(), ref["logits_coarse"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.logits_attn[i].numpy(), ref["logits_attn"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(res.boxes.refined[i].numpy(), ref["logits_refined"], rtol=0, atol=ATOL)
    if "attn_weight" in ref:
        ours = res.attn_weight[i].numpy()
        same = np.isclose(ours, ref["attn_weight"], rtol=0, atol=1e-6)
        assert same.mean() >= 1 - 1e-5  # at most ~10 knife-edge votes flipped of N^2
        assert (ours[~same] == 0).sum() + (ref["attn_weight"][~same] == 0).sum() == (~same).sum()


def test_labeler_tags_images_without_labels_with_tagclip(tiny_clip, voc, tagclip):
    labeler = Labeler(tiny_clip, voc, tagger=tagclip)
    res = labeler.label(Image.open(GOLDEN / "images" / "chelsea.png"))
    ref = golden("chelsea")
    assert res.labels.tolist() == ref["labels"].tolist() and res.label_source == "tagclip"
    scores = ref["logits_max"]
    assert res.threshold == pytest.approx(scores.min() + 0.5 * (scores.max() - scores.min()), abs=1e-6)
    assert set(res.scores) >= {voc.classes[c] for c in ref["labels"]}  # every label's score is recorded
    given = labeler.label(Image.open(GOLDEN / "images" / "chelsea.png"), ["cat"])
    assert given.label_source == "given" and given.threshold is None


# ---------------------------------------------------------------- pieces


def _scipy_box_mask(binary: np.ndarray) -> np.ndarray:
    """The reference rule written with scipy: clipped bounding boxes of 8-connected components."""
    h, w = binary.shape
    out = np.zeros_like(binary)
    lab, _ = ndimage.label(binary, structure=np.ones((3, 3)))
    for sl in ndimage.find_objects(lab):
        out[sl[0].start:min(sl[0].stop, h - 1), sl[1].start:min(sl[1].stop, w - 1)] = True
    return out


def test_component_boxes_match_scipy_labelling():
    rng = np.random.default_rng(0)
    maps = [rng.random((9, 13)) < p for p in (0.05, 0.2, 0.4, 0.6)]
    ring = np.zeros((9, 13), dtype=bool)
    ring[1:8, 1:8] = True
    ring[2:7, 2:7] = False
    ring[4, 4] = True  # a component inside a hole adds nothing
    edge = np.zeros((9, 13), dtype=bool)
    edge[8, :] = True  # only the last row: no box survives the clipping
    edge[0:3, 12] = True  # the last column: clipped away too
    snake = np.zeros((9, 13), dtype=bool)
    snake[::2, :] = True
    snake[1::4, -1] = True
    snake[3::4, 0] = True  # one long component that needs many propagation steps
    maps += [ring, edge, snake, np.zeros((9, 13), dtype=bool)]
    mask, boxes = component_box_mask(torch.from_numpy(np.stack(maps)))
    for m, got in zip(maps, mask.numpy(), strict=True):
        np.testing.assert_array_equal(got, _scipy_box_mask(m))
    assert boxes.shape[1] == 5 and not mask[-1].any() and not mask[-3].any()


def test_relative_labels_are_strict_and_never_empty():
    scores = torch.tensor([[0.1, 0.3, 0.2], [0.5, 0.5, 0.5], [0.0, 1.0, 0.5]])
    labels, thr = relative_labels(scores)
    assert labels == [[1], [0], [1]]  # 0.2 is exactly the threshold: not above it; all equal: the first best
    np.testing.assert_allclose(thr.numpy(), [0.2, 0.5, 0.5])


def test_metrics_follow_the_authors_formulas():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2]])
    truth = torch.tensor([[1, 0], [0, 1], [1, 0]])
    ap = average_precision(scores, truth)
    np.testing.assert_allclose(ap.numpy(), [(1 + 2 / 3) / 2, 1.0])
    f1, p, r = overall_f1(scores, truth)  # predicted: class 0 in every image (0.7 < 0.75 in the second)
    assert (f1, p, r) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    absent = tag_metrics(scores, torch.tensor([[1, 0], [0, 0], [1, 0]]), ["a", "b"])
    assert absent.ap["b"] is None and absent.mean_ap == pytest.approx(5 / 6)
    assert absent.mean_ap_all_classes == pytest.approx(5 / 12)  # the authors' mean counts class b as 0


def test_class_names_follow_the_authors(tmp_path):
    coco_names, coco_bg = tagclip_names(load_class_set("coco"))
    assert coco_names[3:5] == ["motorbike", "aeroplane"] and len(coco_names) == 80 and len(coco_bg) == 23
    voc_names, voc_bg = tagclip_names(load_class_set("voc"))
    assert voc_names[2] == "bird" and voc_bg[-1] == "sign" and len(voc_bg) == 25
    plain = tmp_path / "animals.txt"
    plain.write_text("robot: droid\nzebra\n")
    assert tagclip_names(load_class_set(plain)) == (["robot", "zebra"], voc_bg)  # names, VOC background
    own = tmp_path / "own.yaml"
    own.write_text("classes: [robot, zebra]\nbackground: [floor, wall]\n")
    assert tagclip_names(load_class_set(own)) == (["robot", "zebra"], ["floor", "wall"])


def test_global_tagger_reuses_or_recomputes_the_trunk(tiny_clip, voc):
    from clipes.vit import encode_trunk

    tagger = make_tagger("global", tiny_clip, voc, zero_shot_threshold=0.05)
    assert isinstance(tagger, GlobalTagger) and tagger.threshold == 0.05
    images = torch.stack([preprocess(Image.open(GOLDEN / "images" / "chelsea.png").resize((64, 48)), 16)] * 2)
    alone = tagger.tag(images)
    shared = tagger.tag(images, trunk=encode_trunk(tiny_clip.visual, images, 1)[0])
    # exact: the tagger computes the trunk with this same call on the same batch (same kernels, same data)
    torch.testing.assert_close(alone.scores, shared.scores, rtol=0, atol=0)
    assert alone.labels == shared.labels and alone.thresholds == [0.05, 0.05]


def test_bad_inputs_get_clear_errors(tiny_clip, voc, tagclip, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("cat\n")
    with pytest.raises(TaggerError, match="needs at least 2"):
        TagCLIP(tiny_clip, load_class_set(one))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ClassSetError, match="no classes"):
        load_class_set(empty)
    with pytest.raises(TaggerError, match="--tagger 'nope'"):
        Labeler(tiny_clip, voc, tagger="nope")
    labeler = Labeler(tiny_clip, voc, tagger=tagclip)
    with pytest.raises(TaggerError, match="too small for TagCLIP.*16x32 px"):
        labeler.label(Image.new("RGB", (12, 30)))
    assert labeler.label(Image.new("RGB", (12, 30)), ["cat"]).labels.tolist() == [7]  # labels given: fine
    skipped = labeler.label_prepared([labeler.prepare(Image.new("RGB", (30, 12)))], skip_unusable=True)
    assert isinstance(skipped[0], str) and "too small" in skipped[0]


# ---------------------------------------------------------------- commands


@pytest.fixture()
def folder(tmp_path, golden) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.open(golden / "images" / "chelsea.png").resize((150, 100)).save(images / "chelsea.jpg")
    Image.open(golden / "images" / "coffee.png").resize((120, 80)).save(images / "sub" / "coffee.png")
    Image.new("RGB", (10, 30)).save(images / "tiny.png")
    return images


def test_tag_writes_a_labels_file_and_scores_it(tmp_path, folder, golden):
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    gt = tmp_path / "gt.txt"
    gt.write_text("chelsea cat\nsub/coffee diningtable bottle\n")
    out = tmp_path / "tags.json"
    res = runner.invoke(app, ["tag", str(folder), "--out", str(out), "--model", model, "--device", "cpu",
                              "--gt", str(gt)])
    assert res.exit_code == 0, res.output
    tags = json.loads(out.read_text())
    assert set(tags) == {"chelsea.jpg", "sub/coffee.png"} and "tiny.png" in res.output  # too small: skipped
    entry = tags["chelsea.jpg"]
    assert len(entry["scores"]) == 20 and entry["labels"]
    assert all(entry["scores"][c] > entry["threshold"] for c in entry["labels"])
    assert all(v <= entry["threshold"] for c, v in entry["scores"].items() if c not in entry["labels"])
    voc = load_class_set("voc")
    assert read_labels(out, voc) == {"chelsea": [voc.index(c) for c in entry["labels"]],
                                     "sub/coffee": [voc.index(c) for c in tags["sub/coffee.png"]["labels"]]}
    metrics = json.loads((tmp_path / "tags.metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["tagger"] == {"name": "tagclip", "relative_threshold": 0.5}
    assert metrics["AP"]["cat"] is not None and metrics["AP"]["dog"] is None
    assert 0 <= metrics["mAP"] <= 1 and "mAP" in res.output and "recall (overall)" in res.output
    labelled = runner.invoke(app, ["label", str(folder), "--out", str(tmp_path / "masks"), "--model", model,
                                   "--device", "cpu", "--labels", str(out)])
    assert labelled.exit_code == 0, labelled.output
    assert "labelled 2 image(s)" in labelled.output


def test_tag_refuses_bad_inputs(tmp_path, folder, golden):
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    inside = runner.invoke(app, ["tag", str(folder), "--out", str(folder / "tags.json"), "--model", model])
    assert inside.exit_code == 2 and "inside the input folder" in inside.output
    one = tmp_path / "one.txt"
    one.write_text("cat\n")
    res = runner.invoke(app, ["tag", str(folder), "--classes", str(one), "--out", str(tmp_path / "t.json"),
                              "--model", model])
    assert res.exit_code == 2 and "needs at least 2" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    res = runner.invoke(app, ["tag", str(folder), "--classes", str(empty), "--out", str(tmp_path / "t.json")])
    assert res.exit_code == 2 and "no classes" in res.output
    res = runner.invoke(app, ["tag", str(folder), "--tagger", "nope", "--out", str(tmp_path / "t.json")])
    assert res.exit_code == 2 and "--tagger 'nope'" in res.output
    res = runner.invoke(app, ["tag", str(folder), "--out", str(tmp_path), "--model", model])
    assert res.exit_code == 2 and "is a folder" in res.output
    assert not (tmp_path / "t.json").exists()


def test_tag_scores_a_dataset_split(tmp_path, golden):
    voc = tmp_path / "data" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for stem, names in (("a", ["cat"]), ("b", ["dog", "person"])):
        Image.open(golden / "images" / "chelsea.png").resize((64, 48)).save(voc / "JPEGImages" / f"{stem}.jpg")
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (voc / "Annotations" / f"{stem}.xml").write_text(f"<annotation>{objects}</annotation>")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    out = tmp_path / "out" / "tags.json"
    res = runner.invoke(app, ["tag", "--dataset", "voc", "--root", str(tmp_path / "data"), "--split", "val", "--out",
                              str(out), "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())) == {"a.jpg", "b.jpg"}
    assert json.loads((tmp_path / "out" / "tags.metrics.json").read_text())["images"] == 2


def test_label_without_labels_runs_tagclip_and_refuses_another_tagger(tmp_path, folder, golden):
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    out = tmp_path / "out"
    res = runner.invoke(app, ["label", str(folder), "--out", str(out), "--model", model, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    labels = json.loads((out / "labels.json").read_text())
    assert set(labels) == {"chelsea", "sub/coffee"} and "tiny.png" in res.output
    for entry in labels.values():
        assert entry["source"] == "tagclip" and entry["labels"]
        assert all(entry["scores"][c] > entry["threshold"] for c in entry["labels"])
    assert json.loads((out / "manifest.json").read_text())["settings"]["tagger"]["name"] == "tagclip"
    again = runner.invoke(app, ["label", str(folder), "--out", str(out), "--model", model, "--device", "cpu",
                                "--tagger", "global"])
    assert again.exit_code == 2 and "tagger" in again.output


def test_patch_level_maths_stays_float32_under_autocast(tagclip):
    image = preprocess(Image.open(GOLDEN / "images" / "chelsea.png").resize((96, 64)), 16)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tagclip.run(image)
    assert out.logits_coarse.dtype == out.boxes.refined.dtype == out.logits_max.dtype == torch.float32
    assert out.labels[0] == [c for c, v in enumerate(out.logits_max[0].tolist()) if v > float(out.thresholds[0])]
