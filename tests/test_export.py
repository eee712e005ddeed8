"""``clipes export``: COCO RLE, CVAT segmentation masks and Hugging Face datasets round-trip a run's masks.

Runs are made by ``clipes label`` with the tiny random checkpoint: a VOC run refined by the CRF with
``--confidence 0.95`` (so it ignores pixels: 255), a COCO run, and a run of a user class set tagged
zero-shot (so it has scores). One image of each has no foreground.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.evaluate import read_label_png

pytest.importorskip("pycocotools")
runner = CliRunner()

RUNS = ("voc_crf", "coco", "user")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, golden) -> dict[str, Path]:
    """Three small runs over one photo folder (a sub-folder, an image without foreground)."""
    root = tmp_path_factory.mktemp("export")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.open(golden / "images" / "chelsea.png").resize((96, 64)).save(photos / "chelsea.jpg")
    Image.open(golden / "images" / "coffee.png").resize((80, 64)).save(photos / "sub" / "coffee.png")
    Image.open(golden / "images" / "2007_000033.png").resize((64, 48)).save(photos / "empty.png")
    model = golden / "tiny-clip-vit-b16-random.pt"
    voc_labels = root / "voc.json"
    voc_labels.write_text(json.dumps({"chelsea": ["cat"], "sub/coffee": ["diningtable", "bottle"], "empty": []}))
    coco_labels = root / "coco.json"
    coco_labels.write_text(json.dumps({"chelsea": ["cat"], "sub/coffee": ["cup", "dining table"], "empty": []}))
    (root / "classes.txt").write_text("disc: circle\nsquare: box\nteapot\n")
    common = ("--model", model, "--device", "cpu")
    args = {"voc_crf": ("--labels", voc_labels, "--refine", "crf", "--confidence", "0.95"),
            "coco": ("--classes", "coco", "--labels", coco_labels),
            "user": ("--classes", root / "classes.txt", "--tagger", "global")}
    out = {}
    for name, extra in args.items():
        res = _invoke("label", photos, "--out", root / name, *common, *extra)
        assert res.exit_code == 0, res.output
        out[name] = root / name
    out["photos"] = photos
    return out


def _masks(run: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(run / "masks").with_suffix("").as_posix(): read_label_png(p)
            for p in sorted((run / "masks").rglob("*.png"))}


def _classes(run: Path) -> list[str]:
    return json.loads((run / "manifest.json").read_text())["settings"]["classes"]["classes"]


def test_the_runs_hold_what_the_round_trips_need(runs):
    """The CRF run ignores pixels, every run has an image with no foreground, the zero-shot run has scores."""
    crf = _masks(runs["voc_crf"])
    assert any((m == 255).any() for m in crf.values())
    assert all(not _masks(runs[r])["empty"].any() for r in ("voc_crf", "coco"))
    assert set(crf) == {"chelsea", "sub/coffee", "empty"}
    assert all(r["scores"] for r in json.loads((runs["user"] / "labels.json").read_text()).values())


def _paint(coco_path: Path, run: Path):
    """The run's masks painted back from the COCO file with pycocotools (255 for the ``ignore`` category)."""
    from pycocotools import mask as mask_api
    from pycocotools.coco import COCO

    coco = COCO(str(coco_path))
    names = _classes(run)
    value = {c["id"]: 255 if c["name"] == "ignore" else names.index(c["name"]) + 1
             for c in coco.dataset["categories"]}
    painted = {}
    labels = json.loads((run / "labels.json").read_text())
    by_file = {rec["file"]: stem for stem, rec in labels.items()}
    for image in coco.dataset["images"]:
        canvas = np.zeros((image["height"], image["width"]), np.uint8)
        covered = np.zeros_like(canvas, dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            m = coco.annToMask(ann).astype(bool)
            assert not (covered & m).any(), "annotations of one image overlap"
            assert ann["area"] == int(m.sum()) > 0
            assert ann["bbox"] == mask_api.toBbox(ann["segmentation"]).tolist()
            assert ann["iscrowd"] == (1 if value[ann["category_id"]] == 255 else 0)
            covered |= m
            canvas[m] = value[ann["category_id"]]
        painted[by_file[image["file_name"]]] = canvas
    return coco, painted


@pytest.mark.parametrize("name", RUNS)
def test_coco_round_trip(runs, tmp_path, name):
    run = runs[name]
    before = _digest(run)
    masks = _masks(run)
    out = tmp_path / "coco.json"
    res = _invoke("export", run, "--format", "coco", "--out", out, "--ignore-category")
    assert res.exit_code == 0, res.output
    coco, painted = _paint(out, run)
    assert painted.keys() == masks.keys()
    for stem, mask in masks.items():
        np.testing.assert_array_equal(painted[stem], mask, err_msg=stem)
    # without --ignore-category the ignored pixels are left out: background when painted back
    res = _invoke("export", run, "--format", "coco", "--out", out)
    assert res.exit_code == 0, res.output
    coco, painted = _paint(out, run)
    assert "ignore" not in [c["name"] for c in coco.dataset["categories"]]
    for stem, mask in masks.items():
        np.testing.assert_array_equal(painted[stem], np.where(mask == 255, 0, mask), err_msg=stem)
    assert _digest(run) == before  # the run is only read
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_coco_category_ids(runs, tmp_path):
    """COCO's own category ids for the coco class set (cat 17, cup 47, dining table 67), 1..K otherwise."""
    for name, expected in (("coco", {"cat": 17, "cup": 47, "dining table": 67, "toothbrush": 90}),
                           ("voc_crf", {"aeroplane": 1, "cat": 8, "tvmonitor": 20}),
                           ("user", {"disc": 1, "square": 2, "teapot": 3})):
        out = tmp_path / f"{name}.json"
        assert _invoke("export", runs[name], "-f", "coco", "-o", out).exit_code == 0
        data = json.loads(out.read_text())
        ids = {c["name"]: c["id"] for c in data["categories"]}
        assert len(ids) == len(_classes(runs[name]))
        assert {k: ids[k] for k in expected} == expected
        assert {im["file_name"] for im in data["images"]} == {"chelsea.jpg", "sub/coffee.png", "empty.png"}
        empty = next(im["id"] for im in data["images"] if im["file_name"] == "empty.png")
        assert not [a for a in data["annotations"] if a["image_id"] == empty]


def test_coco_instances_are_connected_regions(runs, tmp_path, monkeypatch):
    from scipy import ndimage

    monkeypatch.setattr("clipes.export.coco._STACK_BYTES", 1)  # RLE-encode one region at a time
    run = runs["voc_crf"]
    out = tmp_path / "inst.json"
    res = _invoke("export", run, "-f", "coco", "-o", out, "--instances", "--ignore-category", "--min-area", "0")
    assert res.exit_code == 0, res.output
    coco, painted = _paint(out, run)
    for stem, mask in _masks(run).items():
        np.testing.assert_array_equal(painted[stem], mask, err_msg=stem)
    for ann in coco.dataset["annotations"]:
        if not ann["iscrowd"]:
            assert ndimage.label(coco.annToMask(ann), structure=np.ones((3, 3)))[1] == 1
    assert _invoke("export", run, "-f", "coco", "-o", tmp_path / "class.json").exit_code == 0
    per_class = json.loads((tmp_path / "class.json").read_text())["annotations"]
    regions = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    assert len(regions) > len(per_class)  # the CRF's holes split some class into several regions


def _read_cvat(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label names and masks from a CVAT Segmentation mask folder, by colour, as CVAT reads it."""
    names, colours = [], {}
    for line in (folder / "labelmap.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, rgb = line.split(":")[:2]
        colours[tuple(int(c) for c in rgb.split(","))] = len(names)
        names.append(name)
    stems = (folder / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    masks = {}
    for stem in stems:
        rgb = np.asarray(Image.open(folder / "SegmentationClass" / f"{stem}.png").convert("RGB"))
        index = np.full(rgb.shape[:2], -1)
        for colour, i in colours.items():
            index[(rgb == colour).all(-1)] = i
        assert (index >= 0).all(), f"{stem}: a colour labelmap.txt does not declare"
        masks[stem] = index
    return names, masks


@pytest.mark.parametrize("name", RUNS)
def test_cvat_round_trip(runs, tmp_path, name):
    run = runs[name]
    out = tmp_path / "cvat"
    res = _invoke("export", run, "--format", "cvat", "--out", out)
    assert res.exit_code == 0, res.output
    names, masks = _read_cvat(out)
    run_masks = _masks(run)
    ignores = any((m == 255).any() for m in run_masks.values())
    assert names == ["background", *_classes(run), *(["ignore"] if ignores else [])]
    assert masks.keys() == run_masks.keys()
    for stem, mask in run_masks.items():
        expected = np.where(mask == 255, len(names) - 1, mask) if ignores else mask
        np.testing.assert_array_equal(masks[stem], expected, err_msg=stem)
    assert not (out / "JPEGImages").exists()
    # the same as a zip archive, ready for CVAT's upload
    res = _invoke("export", run, "--format", "cvat", "--out", tmp_path / "cvat.zip")
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(tmp_path / "cvat.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    assert _digest(tmp_path / "unzipped") == _digest(out)


def test_cvat_photos_linked_or_copied(runs, tmp_path):
    photos = runs["photos"]
    for mode in ("link", "copy"):
        out = tmp_path / mode
        res = _invoke("export", runs["voc_crf"], "-f", "cvat", "-o", out, "--images", mode)
        assert res.exit_code == 0, res.output
        for stem, file in (("chelsea", "chelsea.jpg"), ("sub/coffee", "sub/coffee.png"), ("empty", "empty.png")):
            copy = out / "JPEGImages" / f"{stem}{Path(file).suffix}"
            assert copy.is_symlink() == (mode == "link")
            assert copy.read_bytes() == (photos / file).read_bytes()


@pytest.mark.parametrize("name", RUNS)
def test_hf_round_trip(runs, tmp_path, name):
    datasets = pytest.importorskip("datasets")
    run = runs[name]
    out = tmp_path / "hf"
    res = _invoke("export", run, "--format", "hf", "--out", out, "--images", "copy")
    assert res.exit_code == 0, res.output
    ds = datasets.load_from_disk(str(out))
    records = json.loads((run / "labels.json").read_text())
    run_masks = _masks(run)
    assert ds["stem"] == sorted(records) == sorted(run_masks)
    label_names = ds.features["labels"].feature.names
    assert label_names == _classes(run)
    for row in ds:
        rec = records[row["stem"]]
        np.testing.assert_array_equal(np.asarray(row["mask"]), run_masks[row["stem"]], err_msg=row["stem"])
        assert [label_names[i] for i in row["labels"]] == rec["labels"]
        assert row["label_source"] == rec["source"] and row["file"] == rec["file"]
        photo = Image.open(runs["photos"] / rec["file"])
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(photo))
        if "scores" in rec:
            assert {label_names[s["class"]]: s["score"] for s in row["scores"]} == \
                pytest.approx(rec["scores"], abs=1e-6)  # float32 in Arrow
            assert row["threshold"] == pytest.approx(rec["threshold"], abs=1e-6)
    assert ("scores" in ds.features) == (name == "user")


def test_hf_photos_by_path_or_left_out(runs, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert _invoke("export", runs["coco"], "-f", "hf", "-o", tmp_path / "link").exit_code == 0
    ds = datasets.load_from_disk(str(tmp_path / "link"))
    assert ds["image"] == [str((runs["photos"] / f).resolve()) for f in ds["file"]]
    assert _invoke("export", runs["coco"], "-f", "hf", "-o", tmp_path / "none", "--images", "none").exit_code == 0
    assert "image" not in datasets.load_from_disk(str(tmp_path / "none")).features


def test_rerun_replaces_an_earlier_export(runs, tmp_path):
    """A second export into the same place replaces the first whole (nothing of it stays behind)."""
    out = tmp_path / "cvat"
    assert _invoke("export", runs["voc_crf"], "-f", "cvat", "-o", out, "--images", "copy").exit_code == 0
    assert (out / "JPEGImages").is_dir()
    res = _invoke("export", runs["voc_crf"], "-f", "cvat", "-o", out)
    assert res.exit_code == 0, res.output
    assert not (out / "JPEGImages").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cvat"]


def _error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return " ".join(res.output.split())


@pytest.mark.parametrize(("args", "message"), [
    (("-f", "coco", "-o", "{run}/coco.json"), "is inside the input folder"),
    (("-f", "hf", "-o", "{run}/hf"), "is inside the input folder"),
    (("-f", "cvat", "-o", "{photos}/cvat"), "is inside the input folder"),
    (("-f", "cvat", "-o", "{tmp}/busy"), "holds other files"),
    (("-f", "coco", "-o", "{tmp}/busy"), "is a folder"),
    (("-f", "hf", "-o", "{tmp}/file.txt"), "is a file"),
    (("-f", "cvat", "-o", "{tmp}/x", "--instances"), "--instances goes with --format coco"),
    (("-f", "coco", "-o", "{tmp}/x.json", "--images", "copy"), "--images goes with --format cvat or hf"),
    (("-f", "yolo", "-o", "{tmp}/x"), "choose one of coco, cvat, hf"),
])
def test_bad_targets_and_options_are_refused(runs, tmp_path, args, message):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    before = _digest(runs["voc_crf"]), _digest(runs["photos"]), _digest(tmp_path)
    fill = {"run": runs["voc_crf"], "photos": runs["photos"], "tmp": tmp_path}
    out = _error(_invoke("export", runs["voc_crf"], *(a.format(**fill) for a in args)))
    assert message in out
    assert (_digest(runs["voc_crf"]), _digest(runs["photos"]), _digest(tmp_path)) == before


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_a_run_with_missing_or_edited_masks_is_refused(runs, tmp_path):
    run = _copy_run(runs["voc_crf"], tmp_path / "run")
    (run / "masks" / "sub" / "coffee.png").unlink()
    out = _error(_invoke("export", run, "-f", "coco", "-o", tmp_path / "c.json"))
    assert "1 image(s) of labels.json have no mask" in out and "'sub/coffee'" in out
    run = _copy_run(runs["voc_crf"], tmp_path / "run2")
    mask = read_label_png(run / "masks" / "chelsea.png")
    mask[0, 0] = 200
    Image.fromarray(mask).save(run / "masks" / "chelsea.png")
    for fmt, out in (("cvat", tmp_path / "cvat"), ("hf", tmp_path / "hf"), ("cvat", tmp_path / "c.zip")):
        msg = _error(_invoke("export", run, "-f", fmt, "-o", out))
        assert "chelsea.png: value 200 is no class of 'voc'" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run2"]  # nothing written, nothing left over


def test_a_manifest_without_its_input_folder_is_refused(runs, tmp_path):
    run = _copy_run(runs["coco"], tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["input"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "records no input folder" in _error(_invoke("export", run, "-f", "coco", "-o", tmp_path / "c.json"))
    assert not (tmp_path / "c.json").exists()


def test_not_a_run_is_refused(tmp_path):
    assert "no such run folder" in _error(_invoke("export", tmp_path / "nope", "-f", "coco", "-o", tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    assert "is not a clipes output folder" in _error(_invoke("export", tmp_path / "empty", "-f", "cvat",
                                                             "-o", tmp_path / "c"))


def test_the_command_offers_what_the_library_does():
    """``clipes export --help`` spells the choices without importing clipes.export: the same choices."""
    from clipes.cli.export import _FORMATS, _IMAGE_MODES
    from clipes.export import FORMATS, IMAGE_MODES

    assert (_FORMATS, _IMAGE_MODES) == (FORMATS, IMAGE_MODES)
