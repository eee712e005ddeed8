"""VOC- and COCO-layout fixtures built from real photos: label, eval and view end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.datasets import CocoGroundTruth, DatasetError, coco_split, voc_split

runner = CliRunner()
EXIF_STEM = "2007_000676"  # a training image saved with an EXIF orientation


@pytest.fixture(scope="module")
def voc_root(golden, tmp_path_factory) -> Path:
    """VOCdevkit/VOC2012 with the seven golden VOC crops, their real ground truth and XML labels."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    voc = root / "VOC2012"
    for d in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    labels = json.loads((golden / "labels.json").read_text())
    stems = sorted(p.stem for p in (golden / "gt").glob("*.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees on display": the annotations are of the pixels as stored
    for stem in stems:
        image = Image.open(golden / "images" / f"{stem}.png").convert("RGB")
        gt = Image.open(golden / "gt" / f"{stem}.png")
        if stem == EXIF_STEM:  # not square, so that a rotation shows in the size
            image, gt = image.crop((0, 0, image.width, 400)), gt.crop((0, 0, gt.width, 400))
        image.save(voc / "JPEGImages" / f"{stem}.jpg", quality=95, exif=exif.tobytes() if stem == EXIF_STEM else b"")
        gt.save(voc / "SegmentationClass" / f"{stem}.png")
        objects = "".join(f"<object><name>{n}</name></object>" for n in labels[f"{stem}.png"])
        (voc / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.jpg</filename>{objects}"
                                                         "</annotation>")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems[:5]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems[5:]) + "\n")
    return root


def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def coco_root(golden, tmp_path_factory) -> Path:
    """A COCO 2014 layout: the two golden photos with drawn polygon objects and a crowd region."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    (root / "annotations").mkdir()
    images = []
    for i, name in enumerate(["chelsea", "coffee"], 1):
        img = Image.open(golden / "images" / f"{name}.png").convert("RGB")
        file = f"COCO_val2014_{i:012d}.jpg"
        img.save(root / "val2014" / file, quality=95)
        images.append({"id": i, "file_name": file, "height": img.height, "width": img.width})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 17, "segmentation": _polygon(100, 50, 300, 250), "area": 40000,
         "bbox": [100, 50, 200, 200], "iscrowd": 0},                      # cat
        {"id": 2, "image_id": 2, "category_id": 47, "segmentation": _polygon(200, 100, 400, 300), "area": 40000,
         "bbox": [200, 100, 200, 200], "iscrowd": 0},                     # cup
        {"id": 3, "image_id": 2, "category_id": 50, "segmentation": _polygon(250, 150, 300, 200), "area": 2500,
         "bbox": [250, 150, 50, 50], "iscrowd": 0},                       # spoon, on top of the cup
        {"id": 4, "image_id": 2, "category_id": 47, "segmentation": _polygon(0, 0, 60, 60), "area": 3600,
         "bbox": [0, 0, 60, 60], "iscrowd": 1},                           # a crowd of cups
    ]
    cats = [{"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}, {"id": 50, "name": "spoon"}]
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_voc_split_reads_layout(voc_root):
    split = voc_split(voc_root, "train")
    assert len(split.items) == 5 and split.gt_dir.name == "SegmentationClass"
    assert split.labels["2009_000573"] == [1, 4]  # bicycle, bottle
    assert voc_split(voc_root / "VOC2012", "val").items[0][1].suffix == ".jpg"
    with pytest.raises(DatasetError, match="no split file for 'test'"):
        voc_split(voc_root, "test")
    with pytest.raises(DatasetError, match="no JPEGImages"):
        voc_split(voc_root / "VOC2012" / "Annotations", "train")


def test_coco_ground_truth_rasterises_with_crowd_as_void(coco_root):
    split = coco_split(coco_root, "val")
    assert [s for s, _ in split.items] == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    assert split.labels == {"COCO_val2014_000000000001": [15], "COCO_val2014_000000000002": [41, 44]}
    gt = CocoGroundTruth(split.coco_json)
    cat = gt.mask("COCO_val2014_000000000001")
    assert cat[150, 200] == 16 and cat[10, 10] == 0  # cat is class 15 -> value 16
    cup = gt.mask("COCO_val2014_000000000002")
    assert cup[120, 220] == 42 and cup[175, 275] == 45  # the small spoon stays on top of the cup
    assert cup[30, 30] == 255 and cup[350, 500] == 0


def _invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_voc_label_eval_view_end_to_end(voc_root, golden, tmp_path):
    out = tmp_path / "out"
    model = golden / "tiny-clip-vit-b16-random.pt"
    _invoke("label", voc_root, "--dataset", "voc", "--split", "train", "--out", out, "--model", model,
            "--device", "cpu", "--save-cams", "--workers", "0")
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 5 and labels["2009_000573"]["labels"] == ["bicycle", "bottle"]
    # --dataset reads the pixels as stored (as the authors and the annotations): the EXIF tag is not applied
    assert json.loads((out / "manifest.json").read_text())["settings"]["exif_transpose"] is False
    stored = Image.open(voc_root / "VOC2012" / "JPEGImages" / f"{EXIF_STEM}.jpg").size
    assert Image.open(out / "masks" / f"{EXIF_STEM}.png").size == stored != stored[::-1]
    assert labels["2009_000573"]["file"] == "VOC2012/JPEGImages/2009_000573.jpg"

    gt_dir = voc_root / "VOC2012" / "SegmentationClass"
    res = _invoke("eval", out, gt_dir)
    assert "mIoU" in res.output and "2 ground-truth image(s) have no prediction" in res.output
    report = json.loads((out / "eval.json").read_text())
    # recompute the mIoU directly from the PNGs
    inter, union = np.zeros(21), np.zeros(21)
    present = np.zeros(21, bool)
    for stem in labels:
        pred = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        gt = np.asarray(Image.open(gt_dir / f"{stem}.png"))
        valid = gt != 255
        for c in range(21):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
            present[c] |= bool(np.any((gt == c) & valid))
    assert report["miou"] == pytest.approx(np.mean(inter[present] / union[present]))
    assert report["images"] == 5 and Image.open(out / "eval_iou.png").size[0] > 100

    res = _invoke("eval", out, gt_dir, "--search-bg-power", "1,2", "--json", tmp_path / "search.json")
    search = json.loads((tmp_path / "search.json").read_text())
    assert set(search["bg_power_search"]) == {"1", "2"}
    assert search["miou"] == pytest.approx(max(search["bg_power_search"].values()))
    assert search["miou"] >= report["miou"] - 1e-12  # t = 1 is one of the candidates

    _invoke("view", out, "--gt", gt_dir)
    page = (out / "view" / "index.html").read_text()
    assert page.count("<tr><td>") == 5 and "cam/2009_000573.1.jpg" in page and "mean per-image mIoU" in page
    assert (out / "view" / "mask" / "2009_000573.jpg").is_file()


def test_coco_label_and_eval(coco_root, golden, tmp_path):
    out = tmp_path / "out"
    _invoke("label", coco_root, "--dataset", "coco", "--split", "val", "--out", out, "--model",
            golden / "tiny-clip-vit-b16-random.pt", "--device", "cpu", "--workers", "0")
    assert json.loads((out / "labels.json").read_text())["COCO_val2014_000000000002"]["labels"] == ["cup", "spoon"]
    res = _invoke("eval", out, coco_root / "annotations" / "instances_val2014.json")
    report = json.loads((out / "eval.json").read_text())
    assert len(report["classes"]) == 81 and report["images"] == 2 and "mIoU" in res.output
    assert report["classes"]["cup"]["in_ground_truth"] and not report["classes"]["dog"]["in_ground_truth"]


def test_crf_options(tmp_path, golden, voc_root):
    model = golden / "tiny-clip-vit-b16-random.pt"
    res = runner.invoke(app, ["label", str(voc_root), "--dataset", "voc", "--split", "val", "--out",
                              str(tmp_path / "a"), "--model", str(model), "--confidence", "0.95"])
    assert res.exit_code == 2 and "--confidence needs --crf" in res.output
    out = tmp_path / "b"
    _invoke("label", voc_root, "--dataset", "voc", "--split", "val", "--out", out, "--model", model,
            "--device", "cpu", "--crf", "--confidence", "0.95", "--save-cams", "--workers", "0")
    stem = voc_split(voc_root, "val").items[0][0]
    mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
    cams = np.load(out / "cams" / f"{stem}.npz")
    assert ((mask == 255) == (cams["confidence"] < 0.95)).all()
    assert cams["confidence"].shape == mask.shape


def test_coco_takes_the_images_with_labels_as_the_authors_lists(golden, tmp_path):
    """Unannotated and crowd-only images are left out of labelling and scoring; sub-folders match."""
    root = tmp_path / "coco"
    (root / "val2014" / "sub").mkdir(parents=True)
    (root / "annotations").mkdir()
    photo = Image.open(golden / "images" / "chelsea.png").convert("RGB").resize((96, 64))
    names = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg", "COCO_val2014_000000000003.jpg",
             "sub/COCO_val2014_000000000004.jpg"]
    images = []
    for i, name in enumerate(names, 1):
        photo.save(root / "val2014" / name)
        images.append({"id": i, "file_name": name, "height": 64, "width": 96})
    box = {"segmentation": _polygon(10, 10, 50, 40), "area": 1200, "bbox": [10, 10, 40, 30]}
    anns = [{"id": 1, "image_id": 1, "category_id": 17, "iscrowd": 0, **box},   # cat
            {"id": 2, "image_id": 3, "category_id": 47, "iscrowd": 1, **box},   # a crowd only: no label
            {"id": 3, "image_id": 4, "category_id": 47, "iscrowd": 0, **box}]   # cup, in a sub-folder
    ann = root / "annotations" / "instances_val2014.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]}))
    split = coco_split(root, "val")
    assert [s for s, _ in split.items] == ["COCO_val2014_000000000001", "sub/COCO_val2014_000000000004"]
    assert split.left_out == 2 and split.labels["sub/COCO_val2014_000000000004"] == [41]
    listed = tmp_path / "val.txt"
    listed.write_text("COCO_val2014_000000000002\nCOCO_val2014_000000000004.jpg\n")
    chosen = coco_split(root, "val", listed)
    assert [s for s, _ in chosen.items] == ["COCO_val2014_000000000002", "sub/COCO_val2014_000000000004"]
    listed.write_text("COCO_val2014_000000000009\n")
    with pytest.raises(DatasetError, match="1 name.s. not in instances_val2014.json"):
        coco_split(root, "val", listed)

    out = tmp_path / "out"
    res = runner.invoke(app, ["label", str(root), "--dataset", "coco", "--split", "val", "--out", str(out),
                              "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "2 image(s) of coco/val have no label and are left out" in " ".join(res.output.split())
    assert (out / "masks" / "sub" / "COCO_val2014_000000000004.png").is_file()
    assert not (out / "masks" / "COCO_val2014_000000000002.png").exists()
    res = runner.invoke(app, ["eval", str(out), str(ann)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "eval.json").read_text())["images"] == 2 and "have no prediction" not in res.output
