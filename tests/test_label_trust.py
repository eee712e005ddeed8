"""``clipes label`` keeps its promises: outputs match their inputs and settings, one writer, nothing lost.

Each test reproduces a way the tool once gave silently wrong results or lost work (issue 9).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipes.labeler import Labeler, LabelResult
from clipes.labels import read_labels
from clipes.output import OutputError, RunOutput
from clipes.prompts import load_class_set
from clipes.provenance import model_identity, settings_key

from .conftest import lock_held_elsewhere
from .test_cli import _label, _labels_file, images  # noqa: F401 - the fixture is used by name


@pytest.fixture()
def model(golden) -> Path:
    return golden / "tiny-clip-vit-b16-random.pt"


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def _other_images(tmp_path: Path, golden: Path) -> Path:
    """The file names of the ``images`` fixture, holding other pictures of other sizes."""
    folder = tmp_path / "other"
    (folder / "sub").mkdir(parents=True)
    coffee = Image.open(golden / "images" / "coffee.png")
    coffee.resize((96, 64)).save(folder / "chelsea.jpg")
    Image.open(golden / "images" / "chelsea.png").resize((64, 96)).save(folder / "sub" / "coffee.png")
    coffee.resize((48, 48)).convert("L").save(folder / "gray.png")
    coffee.resize((32, 56)).convert("RGBA").save(folder / "alpha.png")
    return folder


def test_other_images_with_the_same_names_are_redone(tmp_path, images, golden, model):  # noqa: F811
    out, labels = tmp_path / "out", str(_labels_file(tmp_path))
    assert _label(images, out, "--labels", labels, model=model).exit_code == 0
    other = _other_images(tmp_path, golden)
    res = _label(other, out, "--labels", labels, model=model)
    assert res.exit_code == 0, res.output
    assert "labelled 4 image(s)" in res.output and "0 already done" in res.output
    assert _size(out / "masks" / "chelsea.png") == (96, 64)
    assert _size(out / "masks" / "sub" / "coffee.png") == (64, 96)
    # an image replaced in place (same name, new content) is redone, the others are not
    Image.open(golden / "images" / "chelsea.png").resize((80, 72)).save(other / "gray.png")
    res = _label(other, out, "--labels", labels, model=model)
    assert "labelled 1 image(s)" in res.output and "3 already done" in res.output
    assert _size(out / "masks" / "gray.png") == (80, 72)


def test_settings_are_compared_by_meaning(tmp_path, images, golden, model, monkeypatch):  # noqa: F811
    out, labels = tmp_path / "out", _labels_file(tmp_path)
    assert _label(images, out, "--labels", str(labels), model=model).exit_code == 0
    # the same model by a relative path, and a copy of it elsewhere, is the same model
    monkeypatch.chdir(golden)
    res = _label(images, out, "--labels", str(labels), model=Path(os.path.relpath(model, golden)))
    assert res.exit_code == 0 and "4 already done" in res.output, res.output
    copy = tmp_path / "elsewhere" / "clip.pt"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    res = _label(images, out, "--labels", str(labels), model=copy)
    assert res.exit_code == 0 and "4 already done" in res.output, res.output
    # an edited labels file redoes the images whose labels changed, and only those
    data = json.loads(labels.read_text())
    data["gray"] = ["dog"]
    labels.write_text(json.dumps(data))
    res = _label(images, out, "--labels", str(labels), model=model)
    assert "labelled 1 image(s)" in res.output and "3 already done" in res.output
    assert json.loads((out / "labels.json").read_text())["gray"]["labels"] == ["dog"]
    assert set(np.unique(np.asarray(Image.open(out / "masks" / "gray.png")))) <= {0, 12}  # dog is 12
    # without its manifest, a run folder still refuses other settings
    (out / "manifest.json").unlink()
    res = _label(images, out, "--labels", str(labels), "--bg-power", "2", model=model)
    assert res.exit_code == 2 and "other settings" in res.output and "Traceback" not in res.output


def test_the_default_model_is_the_model_it_names(monkeypatch):
    monkeypatch.delenv("CLIPES_MODEL", raising=False)
    assert model_identity(None) == model_identity("ViT-B-16/openai")
    monkeypatch.setenv("CLIPES_MODEL", "ViT-L-14/openai")
    assert model_identity(None) == "ViT-L-14/openai"


def test_overwrite_leaves_no_stale_outputs(tmp_path, images, golden, model):  # noqa: F811
    out, labels = tmp_path / "out", str(_labels_file(tmp_path))
    assert _label(images, out, "--labels", labels, "--save-cams", "--overlays", model=model).exit_code == 0
    (out / "view").mkdir()
    (out / "view" / "index.html").write_text("old page")
    (images / "gray.png").unlink()
    res = _label(images, out, "--labels", labels, "--overwrite", model=model)
    assert res.exit_code == 0 and "labelled 3 image(s)" in res.output, res.output
    assert sorted(p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.png")) == \
        ["masks/alpha.png", "masks/chelsea.png", "masks/sub/coffee.png"]
    assert not (out / "cams").exists() and not (out / "overlays").exists() and not (out / "view").exists()
    assert "gray" not in json.loads((out / "labels.json").read_text())


def test_a_redone_image_keeps_no_older_outputs(tmp_path, images, golden, model):  # noqa: F811
    out, labels = tmp_path / "out", str(_labels_file(tmp_path))
    assert _label(images, out, "--labels", labels, "--save-cams", model=model).exit_code == 0
    Image.open(golden / "images" / "coffee.png").resize((72, 40)).save(images / "chelsea.jpg")
    assert _label(images, out, "--labels", labels, model=model).exit_code == 0
    assert not (out / "cams" / "chelsea.npz").exists()  # made from the old picture
    assert (out / "cams" / "gray.npz").exists()  # still the outputs of an unchanged input


def test_a_second_writer_is_refused(tmp_path, images, model):  # noqa: F811
    out = tmp_path / "out"
    with lock_held_elsewhere(out) as (holder, _):
        res = _label(images, out, model=model)
        assert res.exit_code == 2 and f"being written by another clipes run (pid {holder.pid})" in res.output
        assert "Traceback" not in res.output and not (out / "masks").exists()
    res = _label(images, out, model=model)  # the lock goes with the process that held it
    assert res.exit_code == 0 and "labelled 4 image(s)" in res.output, res.output


def test_label_keys_keep_dots_and_sub_folders(tmp_path):
    voc = load_class_set("voc")
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"img.v2": ["cat"], "img.v3.JPG": ["dog"], "a/b.png": ["cow"]}))
    assert read_labels(f, voc) == {"img.v2": [7], "img.v3": [11], "a/b": [9]}
    t = tmp_path / "labels.txt"
    t.write_text("img.v2 cat\n")
    assert read_labels(t, voc) == {"img.v2": [7]}


def test_an_image_name_with_a_dot_finds_its_labels(tmp_path, images, model):  # noqa: F811
    shutil.move(images / "gray.png", images / "gray.v2.png")
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"gray.v2": ["dog"], "chelsea": ["cat"], "sub/coffee": ["bottle"], "alpha": []}))
    res = _label(images, tmp_path / "out", "--labels", str(f), model=model)
    assert res.exit_code == 0 and "labelled 4 image(s)" in res.output, res.output
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["gray.v2"]["labels"] == ["dog"]


def test_nothing_is_written_before_the_model_loads(tmp_path, images, model):  # noqa: F811
    out = tmp_path / "out"
    res = _label(images, out, model=tmp_path / "missing.pt")
    assert res.exit_code == 2 and "checkpoint file not found" in res.output
    assert not out.exists()
    res = _label(images, out, model=model)  # the corrected command is not refused
    assert res.exit_code == 0 and "labelled 4 image(s)" in res.output, res.output


def test_an_unknown_tagger_is_refused_before_anything_is_written(tmp_path, images, model):  # noqa: F811
    out = tmp_path / "out"
    res = _label(images, out, "--labels", str(_labels_file(tmp_path)), "--tagger", "bogus", model=model)
    assert res.exit_code == 2 and "--tagger 'bogus'" in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_an_output_folder_that_cannot_be_written_is_refused_first(tmp_path, images, model, monkeypatch, case):  # noqa: F811
    out = tmp_path / "out"
    if case == "file":
        out.write_text("a file")
        expect = "is a file"
    elif case == "under_file":
        (tmp_path / "f").write_text("a file")
        out, expect = tmp_path / "f" / "out", "cannot be made"
    else:
        monkeypatch.setattr("clipes.output.files.os.access", lambda path, mode: Path(path) != tmp_path)
        expect = "is not writable"
    loaded = []
    monkeypatch.setattr("clipes.run.load_clip", lambda *a, **k: loaded.append(1))
    res = _label(images, out, model=model)
    assert res.exit_code == 2 and expect in res.output and "Traceback" not in res.output, res.output
    assert not loaded  # refused before the model was loaded


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, images, model, umask):  # noqa: F811
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert _label(images, out, "--save-cams", "--overlays", model=model).exit_code == 0
    finally:
        os.umask(old)
    files = [out / "masks" / "chelsea.png", out / "cams" / "chelsea.npz", out / "overlays" / "chelsea.jpg",
             out / "labels.json", out / "manifest.json"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_a_symlink_to_a_file_outside_is_a_file_of_the_folder(tmp_path, images, golden, model):  # noqa: F811
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((48, 32)).save(outside / "real.png")
    (images / "link.png").symlink_to(outside / "real.png")
    out = tmp_path / "out"
    res = _label(images, out, model=model)
    assert res.exit_code == 0 and "labelled 5 image(s)" in res.output, res.output
    assert json.loads((out / "labels.json").read_text())["link"]["file"] == "link.png"
    assert _size(out / "masks" / "link.png") == (48, 32)


def test_a_full_disk_stops_with_a_message_and_a_rerun_resumes(tmp_path, images, model, monkeypatch):  # noqa: F811
    out, replace = tmp_path / "out", os.replace
    written = []

    def fill_up(src, dst):
        if Path(dst).suffix == ".png":
            if written:  # room for one mask only
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(dst)
        replace(src, dst)

    monkeypatch.setattr("clipes.output.files.os.replace", fill_up)
    res = _label(images, out, "--batch-size", "1", model=model)
    assert res.exit_code == 2 and "No space left on device" in res.output and "Traceback" not in res.output
    assert "cannot write" in res.output and "masks" in res.output
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr("clipes.output.files.os.replace", replace)
    res = _label(images, out, "--batch-size", "1", model=model)
    assert res.exit_code == 0 and "labelled 3 image(s)" in res.output and "1 already done" in res.output


def test_out_of_memory_on_the_cpu_skips_the_image(tmp_path, images, model, monkeypatch):  # noqa: F811
    real = Labeler.label_prepared

    def tight_memory(self, prepared, **options):
        if any(p.size == (100, 150) for p in prepared):  # chelsea.jpg: "too large" for this machine
            torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator's own error
        return real(self, prepared, **options)

    monkeypatch.setattr(Labeler, "label_prepared", tight_memory)
    out = tmp_path / "out"
    res = _label(images, out, model=model)
    assert res.exit_code == 0, res.output
    assert "labelled 3 image(s)" in res.output and "out of memory" in res.output
    assert not (out / "masks" / "chelsea.png").exists() and (out / "masks" / "gray.png").exists()


def test_the_record_of_done_work_is_as_durable_as_the_files(tmp_path, images, model):  # noqa: F811
    out = tmp_path / "out"
    assert _label(images, out, "--save-cams", model=model).exit_code == 0
    # a kill between two saves of labels.json: the journal still knows every finished image
    (out / "labels.json").unlink()
    res = _label(images, out, "--save-cams", model=model)
    assert res.exit_code == 0 and "4 already done" in res.output, res.output
    assert set(json.loads((out / "labels.json").read_text())) == {"chelsea", "sub/coffee", "gray", "alpha"}
    # truncated outputs are not done
    mask = out / "masks" / "gray.png"
    mask.write_bytes(mask.read_bytes()[:20])
    cams = out / "cams" / "chelsea.npz"
    cams.write_bytes(cams.read_bytes()[:-10])
    res = _label(images, out, "--save-cams", model=model)
    assert "labelled 2 image(s)" in res.output and "2 already done" in res.output
    Image.open(mask).load()
    np.load(cams)["cam"]


def test_a_journal_line_cut_short_is_passed_over(tmp_path):
    out = tmp_path / "out"
    (out / ".clipes").mkdir(parents=True)
    rec = {"stem": "a", "settings": settings_key({"x": 1}), "input": {}, "given": None, "labels": [],
           "source": "given", "outputs": {}}
    cut = json.dumps({**rec, "stem": "b"})[:30]
    (out / ".clipes" / "records.jsonl").write_text(json.dumps(rec) + "\n" + cut)
    assert set(RunOutput(out, {"x": 1}).records) == {"a"}
    with pytest.raises(OutputError, match="other settings"):  # the record names other settings
        RunOutput(out, {"x": 2})


def _result(labels: list[int]) -> LabelResult:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = labels[0] + 1 if labels else 0
    k = len(labels)
    return LabelResult(labels=np.asarray(labels, dtype=np.int64), mask=mask, cam=np.zeros((k, 1, 1)),
                       cam_refined=np.zeros((k, 4, 4)), cam_refined_lowres=np.zeros((k, 1, 1)),
                       box_mask=np.zeros((k, 1)), attention=None, probs=np.zeros(0), input_size=(16, 16))


def test_the_latest_record_wins_whichever_journal_holds_it(tmp_path):
    """A torchrun job killed before its merge leaves per-rank journals; a later single-process run that
    redoes an image (its input changed) must not be overridden by them."""
    out, settings, classes = tmp_path / "out", {"x": 1}, ("cat", "dog")
    old, new = {"file": "a.png", "size": 1, "mtime_ns": 1}, {"file": "a.png", "size": 2, "mtime_ns": 2}
    killed = RunOutput(out, settings, rank=0, world=2)
    killed.open()
    killed.write("a", _result([0]), classes, old, ["cat"])
    killed.close()  # no finalize: the job was killed
    rerun = RunOutput(out, settings)
    assert not rerun.is_done("a", new, ["dog"])
    rerun.open()
    rerun.write("a", _result([1]), classes, new, ["dog"])
    rerun.close_journal()
    rerun.finalize({})
    rerun.close()
    assert json.loads((out / "labels.json").read_text())["a"]["labels"] == ["dog"]
    assert RunOutput(out, settings).is_done("a", new, ["dog"])


def test_a_record_after_a_line_cut_short_is_kept(tmp_path):
    out, settings = tmp_path / "out", {"x": 1}
    (out / ".clipes").mkdir(parents=True)
    stamp = {"file": "a.png", "size": 1, "mtime_ns": 1}
    (out / ".clipes" / "records.jsonl").write_text('{"stem": "b", "sett')  # a kill in the middle of a line
    run = RunOutput(out, settings)
    run.open()
    run.write("a", _result([0]), ("cat",), stamp, None)
    run.close()
    assert RunOutput(out, settings).is_done("a", stamp, None)


def test_a_threshold_the_tagger_does_not_use_is_no_setting(tmp_path):
    """--zero-shot-threshold is the global tagger's: under TagCLIP a resume with another value is the same run."""
    from dataclasses import replace

    from clipes.run import LabelConfig, _settings

    voc = load_class_set("voc")
    cfg = LabelConfig(images=tmp_path, out=tmp_path / "out", model="ViT-B-16/openai", device="cpu")
    assert _settings(replace(cfg, zero_shot_threshold=0.3), voc, None, "float32") == \
        _settings(cfg, voc, None, "float32")
    plain = replace(cfg, tagger="global")
    assert _settings(replace(plain, zero_shot_threshold=0.3), voc, None, "float32") != \
        _settings(plain, voc, None, "float32")


def test_a_folder_that_cannot_be_locked_is_a_clear_error(tmp_path, monkeypatch):
    """A file system without flock (some network and FUSE mounts) is a message, not a traceback."""
    import fcntl

    from clipes.output import folder_lock

    def no_locks(fd, op, *args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(OutputError, match="cannot lock"), folder_lock(tmp_path / "out"):
        pass


def test_a_kill_before_the_first_record_is_resumed(tmp_path, images, model):  # noqa: F811
    """Masks written before any record (a kill right after the first masks) are redone, not refused, when
    the folder's manifest says which run made them; masks of no clipes run are still refused."""
    out = tmp_path / "out"
    assert _label(images, out, "--tagger", "global", model=model).exit_code == 0
    (out / ".clipes" / "records.jsonl").unlink()  # the masks stay, the manifest of this run too
    res = _label(images, out, "--tagger", "global", model=model)
    assert res.exit_code == 0 and "labelled 4 image(s)" in res.output, res.output
    (out / ".clipes" / "records.jsonl").unlink()
    (out / "manifest.json").unlink()
    res = _label(images, out, "--tagger", "global", model=model)
    assert res.exit_code == 2 and "no clipes run recorded" in res.output
