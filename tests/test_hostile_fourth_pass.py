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
    shown = "data-00000-of-00001.arrow, dataset_info.json, state.json" if fmt == "hf" else \
        "JPEGImages, SegmentationClass, SegmentationObject and 1 more"
    _clear_error(res, f"--out {out} holds other files ({shown}; not an earlier clipes export)", "even with --overwrite")
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


# ---------------------------------------------------------------- item 4: poisoned CLIP weights

def test_a_clip_file_with_nan_vision_weights_is_refused_naming_the_tensor(made, tmp_path, golden):
    """``label`` with a CLIP whose vision weights are NaN wrote all-zero masks with exit 0."""
    import torch

    state = torch.load(golden / "tiny-clip-vit-b16-random.pt", weights_only=True)
    state["visual.conv1.weight"] = torch.full_like(state["visual.conv1.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    before = _inputs(made)
    res = _invoke("label", made["photos"], "--out", tmp_path / "out", "--model", tmp_path / "nan.pt", "--device",
                  "cpu", "--workers", "0")
    _clear_error(res, f"--model {tmp_path / 'nan.pt'}: tensor visual.conv1.weight holds NaN or infinite values")
    assert _inputs(made) == before and not (tmp_path / "out").exists()


def _transformers_folder(tmp_path: Path, **save) -> Path:
    from .test_transformers_clip import _config, _save  # skips where transformers is not installed

    folder = tmp_path / "hf-clip"
    model = _save(tmp_path / "unsharded", _config())
    if not save:
        return tmp_path / "unsharded"
    model.save_pretrained(folder, **save)
    shutil.copy(tmp_path / "unsharded" / "config.json", folder)
    return folder


def _label_error(made, tmp_path: Path, model: Path, *expect: str) -> None:
    before = _inputs(made, model)
    res = _invoke("label", made["photos"], "--out", tmp_path / "out", "--model", model, "--device", "cpu",
                  "--workers", "0")
    _clear_error(res, *expect)
    assert _inputs(made, model) == before and not (tmp_path / "out").exists()


def test_a_transformers_folder_with_nan_weights_is_refused(made, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _transformers_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["vision_model.encoder.layers.1.mlp.fc2.bias"][3] = float("inf")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _label_error(made, tmp_path, folder, "tensor visual.transformer.resblocks.1.mlp.c_proj.bias holds NaN or "
                 "infinite values (1 of 64)")


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(made, tmp_path):
    """``model.safetensors.index.json`` naming ``../elsewhere/...`` read weights from outside the folder."""
    folder = _transformers_folder(tmp_path, max_shard_size="2MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.move(folder / shard, tmp_path / "elsewhere" / shard)
    index["weight_map"] = {k: f"../elsewhere/{v}" if v == shard else v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _label_error(made, tmp_path, folder, f"shard '../elsewhere/{shard}' is not a file name inside {folder}")


def test_a_transformers_config_is_compared_with_its_weights_before_building(made, tmp_path):
    """A config claiming 20000 vision blocks (weights of 3) built the model first: past 2 GB for minutes."""
    folder = _transformers_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 20000
    (folder / "config.json").write_text(json.dumps(config))
    _label_error(made, tmp_path, folder, f"{folder}: its config gives the vision tower 20000 layers, its weights "
                 "hold 3")


# ---------------------------------------------------------------- item 4: hostile segment checkpoints

@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    from .synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("seg4"), n_train=4, n_val=2, size=32)


def _train_args(data: Path, out: Path, *extra) -> list[str]:
    from .test_segment_trust import _args

    return _args(data, out, *map(str, extra))


@pytest.fixture(scope="module")
def clip_ckpt(seg_data, tmp_path_factory) -> Path:
    """A clip-linear checkpoint (its CLIP layout recorded) of a tiny CLIP, trained one step."""
    import torch

    from .conftest import make_tiny_openclip

    root = tmp_path_factory.mktemp("ckpt4")
    torch.save(make_tiny_openclip(seed=3, image=32).state_dict(), root / "clip.pt")
    args = _train_args(seg_data, root / "seg", "--clip-model", root / "clip.pt")
    args[args.index("--model") + 1] = "clip-linear"
    args[args.index("--steps") + 1] = "1"
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return root / "seg" / "last.pt"


def _segment_error(seg_data, tmp_path: Path, source: Path, edit, *expect: str) -> None:
    import torch

    from .test_segment_trust import _fails

    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    before = _digests(seg_data, bad)
    res = runner.invoke(app, ["segment", str(seg_data / "val_images"), "--checkpoint", str(bad), "--out",
                              str(tmp_path / "pred"), "--device", "cpu"])
    _fails(res, str(bad), *expect)
    assert _digests(seg_data, bad) == before and not (tmp_path / "pred").exists()


def _nan_weight(ckpt):
    key = sorted(ckpt["model"])[0]
    ckpt["model"][key] = ckpt["model"][key].float().fill_(float("nan"))


@pytest.mark.parametrize(("edit", "expect"), [
    (_nan_weight, "holds NaN or infinite values"),
    (lambda c: c.update(classes=7), "'classes' must be a list of class names, not 7"),
    (lambda c: c["arch"]["clip_vision"].update(layers="twelve"), "layers must be a whole number above 0, not "
                                                                  "'twelve'"),
    (lambda c: c["arch"]["clip_vision"].update(layers=20000), "layers 20000, but its weights have 4"),
    (lambda c: c["arch"]["clip_vision"].update(image_size=160000), "image_size 160000 / patch_size 16 makes"),
    (lambda c: c["arch"]["clip_vision"].update(quick_gelu="yes"), "quick_gelu must be true or false"),
    (lambda c: c.update(arch=[1]), "'arch' must be a mapping"),
])
def test_a_hostile_segment_checkpoint_is_one_line_before_anything_is_built(seg_data, clip_ckpt, tmp_path, edit,
                                                                         expect):
    """A NaN checkpoint gave all-zero masks; ``layers: "twelve"`` or ``classes: 7`` a TypeError; a huge
    recorded layout an allocator error."""
    _segment_error(seg_data, tmp_path, clip_ckpt, edit, expect)


# ---------------------------------------------------------------- items 5 and 6: train-seg refuses up front

def _train_error(seg_data, tmp_path: Path, args: list[str], *expect: str, inputs: tuple[Path, ...] = ()) -> None:
    from .test_segment_trust import _fails

    before = _digests(seg_data, *inputs)
    _fails(runner.invoke(app, args), *expect)
    assert _digests(seg_data, *inputs) == before and not (tmp_path / "o").exists()


def _masks_copy(seg_data: Path, tmp_path: Path, edit) -> Path:
    masks = Path(shutil.copytree(seg_data / "noisy", tmp_path / "masks"))
    edit(sorted(masks.glob("*.png")))
    return masks


def test_masks_that_are_all_ignored_are_refused(seg_data, tmp_path):
    """Masks 255 everywhere wrote a checkpoint trained on nothing."""
    masks = _masks_copy(seg_data, tmp_path, lambda pngs: [Image.fromarray(np.full((32, 32), 255, np.uint8)).save(p)
                                                          for p in pngs])
    args = _train_args(seg_data, tmp_path / "o")
    args[args.index("--masks") + 1] = str(masks)
    _train_error(seg_data, tmp_path, args, "is 255 (ignored)", "nothing to train on", inputs=(masks,))


def test_a_mask_value_beyond_the_class_set_is_found_before_the_first_step(seg_data, tmp_path):
    """A mask value of 40 was found only when a step happened to load that image."""
    def edit(pngs):
        arr = np.asarray(Image.open(pngs[-1])).copy()
        arr[0, 0] = 40
        Image.fromarray(arr).save(pngs[-1])
    masks = _masks_copy(seg_data, tmp_path, edit)
    args = _train_args(seg_data, tmp_path / "o", "--steps", "1")
    args[args.index("--masks") + 1] = str(masks)
    _train_error(seg_data, tmp_path, args, str(sorted(masks.glob("*.png"))[-1]), "mask value(s) 40 are not classes",
                 inputs=(masks,))


@pytest.mark.parametrize("value", [-5.0, 1e30, float("nan")])
def test_confidences_outside_0_1_are_refused_naming_the_file(seg_data, tmp_path, value):
    """Confidences of -5 or 1e30 were used as pixel weights; NaN ones gave only "loss became nan"."""
    cams = tmp_path / "run" / "cams"
    cams.mkdir(parents=True)
    for k, img in enumerate(sorted((seg_data / "images").glob("*.png"))):
        conf = np.full((32, 32), 0.9, np.float32)
        conf[3, 4] = value if k == 2 else 0.5
        np.savez(cams / f"{img.stem}.npz", labels=np.zeros(1, np.int64), cam_refined=np.zeros((1, 32, 32), np.float32),
                 confidence=conf)
    third = sorted(cams.glob("*.npz"))[2]
    _train_error(seg_data, tmp_path, _train_args(seg_data, tmp_path / "o", "--confidence", tmp_path / "run"),
                 str(third), "confidences are pixel weights in [0, 1]", inputs=(cams,))


def test_deeplabv3_with_one_image_a_step_is_refused_with_the_reason(seg_data, tmp_path):
    """``--model deeplabv3-resnet50 --batch-size 1``: "Expected more than 1 value per channel" traceback."""
    args = _train_args(seg_data, tmp_path / "o", "--backbone-weights", "random", "--accumulate", "1")
    args[args.index("--model") + 1] = "deeplabv3-resnet50"
    args[args.index("--batch-size") + 1] = "1"
    _train_error(seg_data, tmp_path, args, "--batch-size 1: deeplabv3-resnet50 trains a BatchNorm on a pooled 1x1 "
                 "map", "use --batch-size 2 or more")


@pytest.mark.parametrize("case", ["resnet18", "nan", "deeplabv2-nan"])
def test_backbone_weights_of_another_resnet_or_not_finite_are_one_line(seg_data, tmp_path, case):
    """A ResNet-18 file for deeplabv3-resnet50: size-mismatch RuntimeError; NaN weights: "loss became nan"."""
    import torch
    from torchvision.models import resnet18

    model = "deeplabv3-resnet50"
    if case == "deeplabv2-nan":
        model, state = "deeplabv2-resnet101", {"layer1.conv1.conv.weight": torch.full((64, 3, 7, 7), float("nan"))}
        expect = "tensor layer1.conv1.conv.weight holds NaN or infinite values"
    elif case == "resnet18":
        state = resnet18().state_dict()
        expect = ("not a torchvision ResNet-50 state dict (layer1.0.conv1.weight is (64, 64, 3, 3), ResNet-50's is "
                  "(64, 64, 1, 1))")
    else:
        state = {"conv1.weight": torch.full((64, 3, 7, 7), float("nan"))}
        expect = "tensor conv1.weight holds NaN or infinite values"
    weights = tmp_path / "backbone.pth"
    torch.save(state, weights)
    args = _train_args(seg_data, tmp_path / "o", "--backbone-weights", weights)
    args[args.index("--model") + 1] = model
    _train_error(seg_data, tmp_path, args, str(weights), expect, inputs=(weights,))


# ---------------------------------------------------------------- item 6: view with a bad CAM file

def test_view_with_string_labels_in_a_cam_file_is_one_line(run):
    """``view`` with string labels in ``cams/*.npz``: ValueError traceback."""
    (run / "cams").mkdir()
    np.savez(run / "cams" / "a.npz", labels=np.array(["cat"]), cam_refined=np.zeros((1, 48, 64), np.float32))
    before = _digests(run)
    res = _invoke("view", run)
    _clear_error(res, str(run / "cams" / "a.npz"), "'labels' must be a list of class numbers")
    assert _digests(run) == before and not (run / "view").exists()
