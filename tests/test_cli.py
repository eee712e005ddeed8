"""``clipes label`` end to end: outputs, resuming, and every bad input a user can give it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app

runner = CliRunner()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def images(tmp_path, golden) -> Path:
    """A small input folder: two golden photos (one in a sub-folder), a grayscale and an RGBA copy."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    chelsea = Image.open(golden / "images" / "chelsea.png")
    chelsea.resize((150, 100)).save(folder / "chelsea.jpg")
    Image.open(golden / "images" / "coffee.png").resize((120, 80)).save(folder / "sub" / "coffee.png")
    chelsea.resize((64, 48)).convert("L").save(folder / "gray.png")
    chelsea.resize((40, 40)).convert("RGBA").save(folder / "alpha.png")
    return folder


def _label(images: Path, out: Path, *extra: str, model: Path):
    args = ["label", str(images), "--out", str(out), "--model", str(model), "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _labels_file(tmp_path: Path) -> Path:
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"chelsea.jpg": ["cat"], "coffee": ["diningtable", "bottle"], "gray": ["cat"],
                             "alpha.png": []}))
    return f


def test_full_run_writes_every_output(tmp_path, images, golden):
    model = golden / "tiny-clip-vit-b16-random.pt"
    before = _tree_digest(images)
    out = tmp_path / "out"
    res = _label(images, out, "--labels", str(_labels_file(tmp_path)), "--save-cams", "--overlays", model=model)
    assert res.exit_code == 0, res.output
    assert "labelled 4 image(s)" in res.output
    assert _tree_digest(images) == before  # the input folder is never written to
    mask = Image.open(out / "masks" / "sub" / "coffee.png")
    assert mask.mode == "P" and mask.size == (120, 80)
    assert set(np.unique(np.asarray(mask))) <= {0, 5, 11}
    assert mask.getpalette()[3 * 5: 3 * 5 + 3] == [128, 0, 128]  # VOC colour of value 5 (bottle)
    assert not np.asarray(Image.open(out / "masks" / "alpha.png")).any()  # no labels: all background
    cams = np.load(out / "cams" / "sub" / "coffee.npz")
    assert cams["labels"].tolist() == [10, 4]
    assert cams["cam"].shape == (2, 5, 8) and cams["cam_refined"].shape == (2, 80, 120)
    assert Image.open(out / "overlays" / "chelsea.jpg").size == (150, 100 + 18)  # legend strip below
    labels = json.loads((out / "labels.json").read_text())
    assert labels["sub/coffee"] == {"labels": ["diningtable", "bottle"], "source": "given", "file": "sub/coffee.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["classes"]["name"] == "voc" and manifest["versions"]["torch"]
    assert manifest["summary"]["labelled"] == 4
    assert not list(out.rglob("*.tmp"))


def test_rerun_resumes_and_overwrite_redoes(tmp_path, images, golden):
    model = golden / "tiny-clip-vit-b16-random.pt"
    out = tmp_path / "out"
    labels = str(_labels_file(tmp_path))
    assert _label(images, out, "--labels", labels, model=model).exit_code == 0
    stamp = (out / "masks" / "chelsea.png").stat().st_mtime_ns
    (out / "masks" / "gray.png").unlink()  # as if the run had stopped before this image
    res = _label(images, out, "--labels", labels, model=model)
    assert res.exit_code == 0, res.output
    assert "labelled 1 image(s)" in res.output and "3 already done" in res.output
    assert (out / "masks" / "gray.png").exists()
    assert (out / "masks" / "chelsea.png").stat().st_mtime_ns == stamp
    res = _label(images, out, "--labels", labels, "--overwrite", model=model)
    assert "labelled 4 image(s)" in res.output
    res = _label(images, out, "--labels", labels, "--save-cams", model=model)  # new outputs asked: redo
    assert "labelled 4 image(s)" in res.output and len(list((out / "cams").rglob("*.npz"))) == 4


def test_other_settings_in_the_same_folder_are_refused(tmp_path, images, golden):
    model = golden / "tiny-clip-vit-b16-random.pt"
    out = tmp_path / "out"
    labels = str(_labels_file(tmp_path))
    assert _label(images, out, "--labels", labels, model=model).exit_code == 0
    res = _label(images, out, "--labels", labels, "--bg-power", "2", model=model)
    assert res.exit_code == 2 and "bg_power" in res.output and "--overwrite" in res.output


def test_zero_shot_run_records_inferred_labels(tmp_path, images, golden):
    out = tmp_path / "out"
    res = _label(images, out, "--tagger", "global", model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 0, res.output
    labels = json.loads((out / "labels.json").read_text())
    assert set(labels) == {"chelsea", "sub/coffee", "gray", "alpha"}
    assert all(v["source"] == "zero-shot" and v["labels"] and v["scores"] for v in labels.values())


def test_unreadable_files_are_reported_and_skipped(tmp_path, images, golden):
    (images / "broken.jpg").write_bytes(b"definitely not a jpeg")
    # rich markup in paths is printed as is: "[crf]" is no style, "[/y]" no closing tag
    (images / "odd[crf].png").write_bytes(b"")
    (images / "x[" / "y]").mkdir(parents=True)
    (images / "x[" / "y]" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    res = _label(images, out, model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 0, res.output
    assert "broken.jpg" in res.output and "3 unreadable" in res.output
    unwrapped = res.output.replace("\n", "")  # rich folds long paths
    assert "odd[crf].png" in unwrapped and "x[/y]/empty.png" in unwrapped
    assert not (out / "masks" / "broken.png").exists() and (out / "masks" / "gray.png").exists()
    assert json.loads((out / "manifest.json").read_text())["summary"]["failed"][0][0].endswith("broken.jpg")


def test_images_missing_from_the_labels_file_are_listed(tmp_path, images, golden):
    f = tmp_path / "few.txt"
    f.write_text("chelsea cat\n")
    res = _label(images, tmp_path / "out", "--labels", str(f), model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 0 and "labelled 1 image(s)" in res.output and "have no entry" in res.output


@pytest.mark.parametrize("case", ["missing", "empty", "file", "out_inside", "unknown_class", "bad_classes",
                                  "dup_classes", "bad_model", "stem_clash"])
def test_bad_input_is_a_clear_error(tmp_path, images, golden, case):
    model = golden / "tiny-clip-vit-b16-random.pt"
    out, extra, expect = tmp_path / "out", [], ""
    if case == "missing":
        images, expect = tmp_path / "nope", "does not exist"
    elif case == "empty":
        images, expect = tmp_path / "empty", "no images"
        images.mkdir()
        (images / "notes.txt").write_text("hi")
    elif case == "file":
        images, expect = images / "gray.png", "is not a folder"
    elif case == "out_inside":
        out, expect = images / "out", "inside the input folder"
    elif case == "unknown_class":
        f = tmp_path / "l.txt"
        f.write_text("chelsea kitten\n")
        extra, expect = ["--labels", str(f)], "l.txt:1: unknown class 'kitten'"
    elif case == "bad_classes":
        extra, expect = ["--classes", "pets"], "neither a built-in class set"
    elif case == "dup_classes":
        f = tmp_path / "dup.txt"
        f.write_text("cat\ndog\ncat\n")
        extra, expect = ["--classes", str(f)], "lists 'cat' twice"
    elif case == "bad_model":
        model, expect = tmp_path / "missing.pt", "checkpoint file not found"
    elif case == "stem_clash":
        shutil.copy(images / "gray.png", images / "gray.jpg")
        expect = "would both write masks/gray.png"
    res = _label(images, out, *extra, model=model)
    assert res.exit_code == 2, res.output
    assert expect in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_version_and_dataset_class_clash(tmp_path):
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("clipes ")
    res = runner.invoke(app, ["label", str(tmp_path), "--dataset", "voc", "--classes", "coco"])
    assert res.exit_code == 2 and "comes with its own class set" in res.output


@pytest.mark.parametrize("command", ["label", "eval", "view", "train-seg", "segment", "tag", "prompts rank"])
def test_flags_show_as_flags_in_help(command):
    """A switch is written ``--flip``, not ``--flip <bool>`` (typer 0.29 printed a metavar for every flag)."""
    res = runner.invoke(app, [*command.split(), "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--help" in res.output, res.output
    assert "<bool>" not in res.output


def test_caa_blocks_are_a_run_setting(tmp_path, images, golden):
    """--caa-blocks -8:-1 (TagCLIP's label-free VOC blocks) is recorded in the run's settings, so a rerun
    with CLIP-ES's blocks into the same folder is refused; a bad slice is refused before anything is written."""
    model = golden / "tiny-clip-vit-b16-random.pt"
    out = tmp_path / "out"
    labels = str(_labels_file(tmp_path))
    res = _label(images, out, "--labels", labels, "--caa-blocks", "-8:-1", model=model)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["caa_blocks"] == "-8:-1" and manifest["options"]["caa_blocks"] == "-8:-1"
    assert manifest["settings"]["exif_transpose"] is True  # a folder keeps the EXIF orientation
    res = _label(images, out, "--labels", labels, model=model)
    assert res.exit_code == 2 and "other settings (caa_blocks)" in " ".join(res.output.split())
    for bad in ("8", "20:"):
        res = _label(images, tmp_path / f"bad{bad}", "--labels", labels, "--caa-blocks", bad, model=model)
        assert res.exit_code == 2 and "--caa-blocks" in res.output and not (tmp_path / f"bad{bad}").exists()
