"""``clipes eval --split-file`` and ``--dataset voc|coco --split``: only the listed images are scored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app

runner = CliRunner()


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


@pytest.fixture()
def voc(tmp_path) -> Path:
    """A VOC2012 folder: four ground truths; train (a, b) predicted wrong, val (c, d) predicted right."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    pred = tmp_path / "pred"
    for i, stem in enumerate(["a", "b", "c", "d"]):
        gt = np.zeros((8, 10), np.uint8)
        gt[2:6, 3:8] = i + 1
        gt[0, 0] = 255
        _png(voc / "SegmentationClass" / f"{stem}.png", gt)
        _png(pred / f"{stem}.png", gt if stem in "cd" else np.zeros_like(gt))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nd\n")
    return tmp_path


def _eval(*args: str) -> tuple[int, str, dict | None]:
    result = runner.invoke(app, ["eval", *args])
    out = Path(args[args.index("--json") + 1]) if "--json" in args else None
    return result.exit_code, result.output, json.loads(out.read_text()) if out and out.is_file() else None


def test_split_file_scores_exactly_the_listed_images(voc, tmp_path):
    gt = voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    code, _, every = _eval(str(voc / "pred"), str(gt), "--json", str(tmp_path / "all.json"))
    assert code == 0 and every["images"] == 4 and every["miou"] < 1
    listed = tmp_path / "val_list.txt"  # the authors' train_aug.txt form, a repeated line, a blank line
    listed.write_text("/JPEGImages/c.jpg /SegmentationClassAug/c.png\nd\n\nd\n")
    code, output, report = _eval(str(voc / "pred"), str(gt), "--split-file", str(listed), "--json",
                                 str(tmp_path / "val.json"))
    assert code == 0, output
    assert report["images"] == 2 and sorted(report["per_image_miou"]) == ["c", "d"]
    assert report["miou"] == 1.0
    assert report["split"]["listed"] == 2 and report["split"]["scored"] == 2
    assert report["split"]["outside_split"] == ["a", "b"] and report["missing"] == []
    assert "scored 2 of the 2 image(s)" in output and "1 repeated line" in output
    assert "2 prediction(s) are outside the split" in output


def test_listed_image_without_prediction_is_named_missing(voc, tmp_path):
    (voc / "pred" / "d.png").unlink()
    listed = tmp_path / "val.txt"
    listed.write_text("c\nd\n")
    code, output, report = _eval(str(voc / "pred"), str(voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"),
                                 "--split-file", str(listed), "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    assert report["missing"] == ["d"] and report["images"] == 1 and report["split"]["scored"] == 1
    assert "scored 1 of the 2 image(s)" in output and "1 listed image(s) have no prediction" in output


def test_listed_name_without_ground_truth_is_refused(voc, tmp_path):
    listed = tmp_path / "other.txt"
    listed.write_text("c\n2008_000001\n")
    code, output, _ = _eval(str(voc / "pred"), str(voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"),
                            "--split-file", str(listed))
    assert code != 0
    assert "1 of 2 listed image(s) have no ground truth" in output and "2008_000001" in output
    assert "Traceback" not in output


def test_dataset_voc_split_val(voc, tmp_path):
    code, output, report = _eval(str(voc / "pred"), str(voc), "--dataset", "voc", "--split", "val", "--json",
                                 str(tmp_path / "r.json"))
    assert code == 0, output
    assert sorted(report["per_image_miou"]) == ["c", "d"] and report["miou"] == 1.0
    code, _, report = _eval(str(voc / "pred"), str(voc), "--dataset", "voc", "--split", "train", "--json",
                            str(tmp_path / "t.json"))
    assert code == 0 and sorted(report["per_image_miou"]) == ["a", "b"] and report["miou"] < 1


def test_split_without_dataset_is_refused(voc):
    code, output, _ = _eval(str(voc / "pred"), str(voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"),
                            "--split", "val")
    assert code != 0 and "--split-file" in output


def test_dataset_coco_scores_the_split_json(tmp_path):
    pytest.importorskip("pycocotools")
    (tmp_path / "annotations").mkdir()
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 20, "width": 20} for i in (1, 2, 3)]
    anns = [{"id": i, "image_id": i, "category_id": 17, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
             "area": 100, "bbox": [2, 2, 10, 10], "iscrowd": 0} for i in (1, 2)]
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 17, "name": "cat"}]}))
    pred = tmp_path / "pred"
    for i in (1, 2, 3):
        _png(pred / f"COCO_val2014_{i:012d}.png", np.zeros((20, 20)))
    listed = tmp_path / "list.txt"
    listed.write_text("COCO_val2014_000000000002\n")
    code, output, report = _eval(str(pred), str(tmp_path), "--dataset", "coco", "--split", "val",
                                 "--split-file", str(listed), "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    assert list(report["per_image_miou"]) == ["COCO_val2014_000000000002"]


def test_split_logic_loads_no_torch():
    code = "import sys, clipes.splits; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
