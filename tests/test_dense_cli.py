"""``clipes label --cam naclip`` (and the other dense methods) on a folder, with and without labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes import load_class_set
from clipes.cli import app

runner = CliRunner()
CLASSES = load_class_set("voc").classes


@pytest.fixture()
def folder(tmp_path, golden) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((90, 60)).save(images / "chelsea.jpg")
    Image.open(golden / "images" / "coffee.png").resize((70, 50)).save(images / "coffee.png")
    return images


def _label(images: Path, out: Path, model: Path, *extra: str):
    return runner.invoke(app, ["label", str(images), "--out", str(out), "--model", str(model), "--device", "cpu",
                               "--cam", "naclip", *extra])


def test_naclip_labels_a_folder_without_and_with_labels(tmp_path, folder, golden):
    model = golden / "tiny-clip-vit-b16-random.pt"
    free = tmp_path / "free"
    res = _label(folder, free, model, "--save-cams")
    assert res.exit_code == 0, res.output
    assert "labelled 2 image(s)" in res.output
    settings = json.loads((free / "manifest.json").read_text())["settings"]
    assert settings["cam"]["name"] == "naclip" and settings["cam"]["scale"] == 336 and settings["cam"]["window"] == 0
    assert settings["refiner"] == {"name": "pamr", "iterations": 10, "dilations": [8, 16]}  # NACLIP's default
    assert settings["tagger"] is None  # open vocabulary: no tagger
    records = json.loads((free / "labels.json").read_text())
    for stem, size in (("chelsea", (90, 60)), ("coffee", (70, 50))):
        mask = Image.open(free / "masks" / f"{stem}.png")
        assert mask.size == size
        present = sorted(int(v) - 1 for v in np.unique(np.asarray(mask)) if v)
        assert records[stem]["source"] == "open-vocabulary"
        assert sorted(records[stem]["labels"]) == sorted(CLASSES[c] for c in present)  # the classes in the mask
        cams = np.load(free / "cams" / f"{stem}.npz")
        assert sorted(cams["labels"].tolist()) == present
        assert cams["cam_refined"].shape == (len(present), size[1], size[0])

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    given = tmp_path / "given"
    res = _label(folder, given, model, "--labels", str(labels), "--dense-prob", "0.2")
    assert res.exit_code == 0, res.output
    assert set(np.unique(np.asarray(Image.open(given / "masks" / "chelsea.png")))) <= {0, 8}
    assert set(np.unique(np.asarray(Image.open(given / "masks" / "coffee.png")))) <= {0, 5, 11}
    assert json.loads((given / "manifest.json").read_text())["settings"]["cam"]["prob_threshold"] == 0.2

    # a rerun with the same settings resumes; other settings are refused, naming them
    res = _label(folder, given, model, "--labels", str(labels), "--dense-prob", "0.2")
    assert res.exit_code == 0 and "0 image(s)" in res.output and "2 already done" in res.output, res.output
    res = _label(folder, given, model, "--labels", str(labels), "--dense-prob", "0.3")
    assert res.exit_code != 0 and "other settings (cam)" in res.output, res.output
    res = _label(folder, given, model, "--labels", str(labels), "--dense-prob", "0.2", "--refine", "none")
    assert res.exit_code != 0 and "other settings (cam, refiner)" in res.output, res.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--refine", "crf"], "--refine crf: --cam naclip makes its own masks"),
    (["--cam", "gradcam", "--dense-scale", "448"], "--dense-scale needs a dense method"),
    (["--dense-window", "-1"], "--dense-window"),
    (["--pamr-iterations", "5", "--refine", "none"], "--pamr-iterations needs --refine pamr"),
])
def test_bad_dense_options_are_refused_before_anything_is_written(tmp_path, folder, golden, extra, message):
    out = tmp_path / "out"
    res = _label(folder, out, golden / "tiny-clip-vit-b16-random.pt", *extra)
    assert res.exit_code != 0 and message in res.output, res.output
    assert not out.exists()


def test_pamr_refines_gradcam_masks(tmp_path, folder, golden):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    out = tmp_path / "out"
    res = runner.invoke(app, ["label", str(folder), "--out", str(out), "--model",
                              str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu", "--labels", str(labels),
                              "--refine", "pamr", "--pamr-iterations", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["refiner"] == {
        "name": "pamr", "iterations": 3, "dilations": [8, 16]}
    assert set(np.unique(np.asarray(Image.open(out / "masks" / "coffee.png")))) <= {0, 5, 11}


def test_the_method_table_knows_which_dense_methods_default_to_pamr():
    """``run_refiner`` decides before torch which refiner a run records; it must agree with the protocols."""
    from clipes.cams import CAMS, DenseCam
    from clipes.method_options import DENSE_CAMS, PAMR_BY_DEFAULT

    dense = {n: c for n, c in CAMS.items() if issubclass(c, DenseCam)}
    assert tuple(dense) == DENSE_CAMS
    assert {n for n, c in dense.items() if c.defaults.pamr_steps} == set(PAMR_BY_DEFAULT)


def test_par_iterations_with_pamr_is_refused_before_torch():
    """PAR's and PAMR's iterations share a constructor keyword; the flag of the other refiner is refused."""
    from clipes.method_options import MethodOptionError, check_method_options

    with pytest.raises(MethodOptionError, match="--par-iterations needs --refine par, not --refine pamr"):
        check_method_options("pamr", "gradcam", "tagclip", iterations=5)
    check_method_options("pamr", "gradcam", "tagclip", pamr_iterations=5)
    with pytest.raises(MethodOptionError, match="--pamr-iterations needs --refine pamr"):
        check_method_options("none", "naclip", "tagclip", pamr_iterations=5)
