"""The fourth hostile trial (issue 28): symlinked outputs, export's --out, damaged and partial runs, poisoned
weights, hostile checkpoints. Each case ends in one clear ``error:`` line or the right result, and the inputs
are byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipes.cli import app

from .conftest import lock_held_elsewhere
from .test_hostile_cli import _clear_error, _said
from .test_hostile_third_pass import _digests, runner

pytest.importorskip("pycocotools")


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory, golden) -> dict[str, Path]:
    """One finished run (given labels) over a folder holding a photo and a link to a photo elsewhere."""
    root = tmp_path_factory.mktemp("fourth")
    photos, elsewhere = root / "photos", root / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((64, 48)).save(photos / "a.png")
    Image.open(golden / "images" / "coffee.png").resize((48, 64)).save(elsewhere / "photo.png")
    (photos / "linked.png").symlink_to(elsewhere / "photo.png")
    labels = root / "lab.json"
    labels.write_text(json.dumps({"a": ["cat"], "linked": ["bottle"]}))
    res = _invoke("label", photos, "--out", root / "run", "--labels", labels, "--model",
                  golden / "tiny-clip-vit-b16-random.pt", "--device", "cpu", "--workers", "0")
    assert res.exit_code == 0, res.output
    return {"root": root, "photos": photos, "elsewhere": elsewhere, "labels": labels, "run": root / "run"}


@pytest.fixture()
def run(made, tmp_path) -> Path:
    """A copy of the finished run to damage (its manifest still names the photos and the labels file)."""
    return Path(shutil.copytree(made["run"], tmp_path / "run", symlinks=True))


def _inputs(made, *more: Path) -> dict[str, str]:
    return _digests(made["photos"], made["elsewhere"], made["labels"], made["run"], *more)


# ---------------------------------------------------------------- item 1: links into the inputs

@pytest.mark.parametrize("fmt", ["coco", "cvat"])
def test_export_onto_a_symlinked_photo_of_the_input_folder_is_refused(made, fmt):
    """``-o IMGS/linked.png``, a link to a photo elsewhere: the photo was replaced by the export (exit 0)."""
    out = made["photos"] / ("linked.png" if fmt == "coco" else "linked.zip")
    if fmt == "cvat":
        (made["photos"] / "linked.zip").symlink_to(made["elsewhere"] / "photo.png")
    before = _inputs(made)
    try:
        res = _invoke("export", made["run"], "-f", fmt, "-o", out)
        _clear_error(res, f"--out {out} is inside the input folder of the run {made['photos']}")
        assert _inputs(made) == before and (made["photos"] / "linked.png").is_symlink()
    finally:
        if fmt == "cvat":
            (made["photos"] / "linked.zip").unlink()


def test_eval_json_onto_a_symlinked_ground_truth_mask_is_refused(tmp_path):
    """``eval PRED GT --json GT/x.png``, ``x.png`` a link: the ground-truth file was replaced by the scores."""
    mask = np.zeros((6, 8), np.uint8)
    mask[2:5, 3:7] = 8
    for folder in ("pred", "gt", "store"):
        (tmp_path / folder).mkdir()
    Image.fromarray(mask).save(tmp_path / "pred" / "x.png")
    Image.fromarray(mask).save(tmp_path / "store" / "x.png")
    (tmp_path / "gt" / "x.png").symlink_to(tmp_path / "store" / "x.png")
    before = _digests(tmp_path)
    res = _invoke("eval", tmp_path / "pred", tmp_path / "gt", "--json", tmp_path / "gt" / "x.png")
    _clear_error(res, f"--json {tmp_path / 'gt' / 'x.png'}", "is inside GT")
    assert _digests(tmp_path) == before and (tmp_path / "gt" / "x.png").is_symlink()


# ---------------------------------------------------------------- item 2: export writes only where it may

def _saved_dataset(folder: Path) -> Path:
    folder.mkdir()
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "dataset_info.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"my own rows")
    return folder


def _cvat_download(folder: Path) -> Path:
    for sub in ("SegmentationClass", "SegmentationObject", "JPEGImages"):
        (folder / sub).mkdir(parents=True)
    (folder / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:64,0,0::\n")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(folder / "SegmentationClass" / "hand-corrected.png")
    return folder


@pytest.mark.parametrize("fmt", ["hf", "cvat"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_never_replaces_a_folder_it_did_not_write(made, tmp_path, fmt, overwrite):
    """A ``save_to_disk`` dataset or a hand-corrected CVAT download looked like an earlier export: deleted."""
    out = _saved_dataset(tmp_path / "mine") if fmt == "hf" else _cvat_download(tmp_path / "mine")
    before = _inputs(made, out)
    res = _invoke("export", made["run"], "-f", fmt, "-o", out, *overwrite)
    _clear_error(res, f"--out {out} holds other files (not an earlier clipes export)", "even with --overwrite")
    assert _inputs(made, out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_onto_the_runs_labels_file_is_refused(made, overwrite):
    """``-f coco -o lab.json``, the run's ``--labels`` file (in its manifest): overwritten with exit 0."""
    before = _inputs(made)
    res = _invoke("export", made["run"], "-f", "coco", "-o", made["labels"], *overwrite)
    _clear_error(res, f"--out {made['labels']} is the run's --labels {made['labels']}, an input")
    assert _inputs(made) == before


def test_export_replaces_its_own_export_and_another_only_with_overwrite(made, run, tmp_path):
    """An export of this run is replaced; of another run or a file clipes did not write, with --overwrite."""
    for fmt, name in (("cvat", "c"), ("cvat", "c.zip"), ("coco", "c.json"), ("hf", "h")):
        out = tmp_path / name
        assert _invoke("export", made["run"], "-f", fmt, "-o", out).exit_code == 0
        res = _invoke("export", made["run"], "-f", fmt, "-o", out)
        assert res.exit_code == 0, res.output
        theirs = _digests(out)
        _clear_error(_invoke("export", run, "-f", fmt, "-o", out), f"--out {out} holds the {fmt} export of the run "
                     f"{made['run'].resolve()}", "--overwrite replaces it")
        assert _digests(out) == theirs
        res = _invoke("export", run, "-f", fmt, "-o", out, "--overwrite")
        assert res.exit_code == 0, res.output
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    _clear_error(_invoke("export", run, "-f", "coco", "-o", mine), f"--out {mine} is a file clipes export did not "
                 "write; --overwrite replaces it")
    assert mine.read_text() == '{"mine": 1}'
    assert _invoke("export", run, "-f", "coco", "-o", mine, "--overwrite").exit_code == 0
    assert json.loads(mine.read_text())["info"]["clipes_export"]["format"] == "coco"


# ---------------------------------------------------------------- item 3: file entries, names, sizes

def _edit_labels(run: Path, edit) -> None:
    labels = json.loads((run / "labels.json").read_text())
    edit(labels)
    (run / "labels.json").write_text(json.dumps(labels))


def test_a_file_entry_outside_the_input_folder_is_refused(made, run, tmp_path):
    """``"file": "../secret/id_rsa"`` with ``--images copy`` shipped that file in the zip."""
    secret = made["root"] / "secret" / "id_rsa"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("PRIVATE KEY")
    _edit_labels(run, lambda labels: labels["a"].update(file="../secret/id_rsa"))
    before = _inputs(made, run, secret)
    res = _invoke("export", run, "-f", "cvat", "-o", tmp_path / "c.zip", "--images", "copy")
    _clear_error(res, "entry 'a' 'file'", "'../secret/id_rsa' is not a name inside")
    assert _inputs(made, run, secret) == before and not (tmp_path / "c.zip").exists()


def _rename_stem(run: Path, old: str, new: str) -> None:
    (run / "masks" / f"{old}.png").rename(run / "masks" / f"{new}.png")
    _edit_labels(run, lambda labels: labels.update({new: labels.pop(old)}))


@pytest.mark.parametrize(("stem", "why"), [("..\\..\\evil", "a backslash"), ("two\nlines", "'\\n'")])
def test_cvat_refuses_an_image_name_a_zip_member_or_its_image_list_cannot_carry(run, tmp_path, stem, why):
    """``..\\..\\evil.png`` became the zip member ``SegmentationClass/..\\..\\evil.png``; a newline in a name
    made default.txt list 4 lines for 3 images."""
    _rename_stem(run, "a", stem)
    before = _digests(run)
    for out in (tmp_path / "c.zip", tmp_path / "c"):
        _clear_error(_invoke("export", run, "-f", "cvat", "-o", out), f"the image {stem!r}", why)
    assert _digests(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(("name", "why"), [("#tag", "comment"), (" cat", "spaces"), ("a\tb", "control character")])
def test_cvat_refuses_a_class_name_labelmap_readers_misread(tmp_path, name, why):
    """A class named ``#tag`` became a labelmap.txt line that CVAT and Datumaro read as a comment."""
    from clipes.export.cvat import write_cvat
    from clipes.export.runfolder import ExportRun, RunImage
    from clipes.prompts import class_set_from_dict

    run = ExportRun(tmp_path, class_set_from_dict({"name": "mine", "classes": ["dog", name]}), tmp_path,
                    (RunImage("a", "a.png", ("dog",), "given"),))
    with pytest.raises(Exception, match=why) as caught:
        write_cvat(run, sink=None)
    assert f"class {name!r}" in str(caught.value)


@pytest.mark.parametrize("fmt", ["coco", "cvat"])
def test_a_mask_of_another_size_than_its_photo_is_refused(run, tmp_path, fmt):
    """A 20x20 mask for a 64x48 photo was exported as is."""
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(run / "masks" / "a.png")
    before = _digests(run)
    out = tmp_path / ("c.json" if fmt == "coco" else "c")
    _clear_error(_invoke("export", run, "-f", fmt, "-o", out), f"{run / 'masks' / 'a.png'}: mask is 20x20 but its "
                 "photo", "is 64x48")
    assert _digests(run) == before and not out.exists()


# ---------------------------------------------------------------- item 3: runs still written or interrupted

def test_export_of_a_run_still_being_written_is_refused_with_counts_or_partial(made, run, tmp_path):
    """``export`` while ``label`` held the run's lock wrote 14 of 40 images, no word."""
    with lock_held_elsewhere(run) as (holder, _):
        before = _digests(run)
        res = _invoke("export", run, "-f", "coco", "-o", tmp_path / "c.json")
        _clear_error(res, f"{run}: 2 of 2 image(s) labelled; the run is still being written (pid {holder.pid}): "
                          "wait for it to finish, or export what is done with --partial")
        assert not (tmp_path / "c.json").exists()
        res = _invoke("export", run, "-f", "coco", "-o", tmp_path / "c.json", "--partial")
        assert res.exit_code == 0, res.output
        assert "note:" in _said(res) and "still being written" in _said(res)
        assert _digests(run) == before  # the lock file too: read, never written


def test_export_of_an_interrupted_run_is_refused_with_counts_or_partial(run, tmp_path):
    """A run killed with SIGKILL: 17 of 40 images exported with exit 0. Here: killed after one of its two
    images, its manifest (written at the start) without the summary, the lock naming the dead process."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("summary")
    manifest["finished"] = False
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / ".clipes" / "lock").write_text("pid 999999999\n")
    _edit_labels(run, lambda labels: labels.pop("linked"))
    (run / "masks" / "linked.png").unlink()
    before = _digests(run)
    _clear_error(_invoke("export", run, "-f", "cvat", "-o", tmp_path / "c"), f"{run}: 1 of 2 image(s) labelled; "
                 f"the run was interrupted: resume it first (clipes label into {run} again), or export what is "
                 "done with --partial")
    assert not (tmp_path / "c").exists()
    res = _invoke("export", run, "-f", "cvat", "-o", tmp_path / "c", "--partial")
    assert res.exit_code == 0, res.output
    assert "note:" in _said(res) and "1 of 2 image(s) labelled" in _said(res)
    assert (tmp_path / "c" / "ImageSets" / "Segmentation" / "default.txt").read_text() == "a\n"
    assert _digests(run) == before


def test_a_finished_run_records_its_count_and_that_it_finished(made):
    manifest = json.loads((made["run"] / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["images"] == 2
    assert manifest["inputs"]["--labels"] == str(made["labels"])


# ---------------------------------------------------------------- item 5: one decompression limit

def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` gray pixels (its data is cut: never decoded here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_a_huge_mask_is_one_line_naming_the_limit_in_export_and_eval(run, tmp_path):
    """A 15000x13000 mask: ``DecompressionBombError`` traceback in export (eval, view, train-seg share the reader)."""
    _png_header_only(run / "masks" / "a.png", 15000, 13000)
    before = _digests(run)
    for res in (_invoke("export", run, "-f", "coco", "-o", tmp_path / "c.json"), _invoke("eval", run, run / "masks")):
        _clear_error(res, str(run / "masks" / "a.png"), "is over the limit of", "CLIPES_MAX_PIXELS")
    assert _digests(run) == before and not (tmp_path / "c.json").exists()


def test_the_pixel_limit_is_one_setting_for_photos_and_masks(tmp_path, monkeypatch):
    from clipes.evaluate import read_label_png
    from clipes.images import read_image
    from clipes.pixels import MAX_PIXELS_ENV

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "p.png")
    assert read_label_png(tmp_path / "m.png").shape == (48, 64)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(64 * 48 - 1))
    for read, name in ((read_label_png, "m.png"), (read_image, "p.png")):
        with pytest.raises(Exception, match="the 64x48 image \\(3072 pixels\\) is over the limit of 3071"):
            read(tmp_path / name)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(64 * 48))
    assert read_image(tmp_path / "p.png").size == (64, 48)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(Exception, match="CLIPES_MAX_PIXELS='lots': give a whole number"):
        read_label_png(tmp_path / "m.png")
    assert os.environ[MAX_PIXELS_ENV] == "lots"
