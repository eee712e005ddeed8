"""The third hostile trial (issue 19): outputs that are inputs, flags not honoured, a lock that outlived its
run, runs that could not be scored, tracebacks. Each case ends in one clear ``error:`` line or a correct
result, and the inputs are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.output import OutputError, folder_lock

from .conftest import lock_held_elsewhere
from .test_hostile_cli import _clear_error, _said


def _digests(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (or the file itself) by content: inputs must come out byte-identical."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- item 3: the lock never outlives its run

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_runs_lock_is_not_held_by_its_orphaned_dataloader_worker(tmp_path, capsys):
    """kill -9 of a run whose DataLoader worker lives on: the next run takes the folder, with a note
    (a flock, shared with the forked worker, refused it for as long as the worker lived)."""
    out = tmp_path / "out"
    with lock_held_elsewhere(out, worker=True) as (run, workers):
        assert workers and all(_alive(w) for w in workers)
        with pytest.raises(OutputError, match=f"another clipes run \\(pid {run.pid}\\)"), folder_lock(out):
            pass  # held while the run lives
        run.kill()
        run.wait()
        time.sleep(0.2)
        assert all(_alive(w) for w in workers)  # the orphaned worker still runs
        with folder_lock(out):
            assert (out / ".clipes" / "lock").read_text() == f"pid {os.getpid()}\n"
        assert f"(pid {run.pid}) was stopped before it finished; taking over its lock" in \
            " ".join(capsys.readouterr().err.split())
    assert (out / ".clipes" / "lock").read_text() == ""  # released in order: no note next time
    with folder_lock(out):
        pass
    assert "taking over" not in capsys.readouterr().err


# ---------------------------------------------------------------- item 1: no output on an input or outside its folder

runner = CliRunner(env={"COLUMNS": "4000"})


@pytest.fixture()
def model(golden) -> Path:
    return golden / "tiny-clip-vit-b16-random.pt"


@pytest.fixture()
def photos(tmp_path, golden) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((64, 48)).save(folder / "a.png")
    Image.open(golden / "images" / "coffee.png").resize((48, 64)).save(folder / "b.png")
    return folder


def _coco(root: Path, file_name: str) -> Path:
    """A COCO 2014 tree whose one image entry has ``file_name``; train2014/ holds a real image too."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "train2014" / "in.png")
    data = {"images": [{"id": 1, "file_name": file_name, "height": 32, "width": 32}],
            "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 9, 0, 9, 9]],
                             "area": 40, "bbox": [0, 0, 9, 9], "iscrowd": 0}]}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_coco_file_name_outside_the_image_folder_is_refused(tmp_path, model, where):
    """An absolute ``file_name`` had its mask written over that image (exit 0); ``../../x.png`` outside --out."""
    victim = tmp_path / "victim" / "x.png"
    victim.parent.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(victim)
    out = tmp_path / "out"
    name = str(victim) if where == "absolute" else "../../victim/x.png"
    root = _coco(tmp_path / "coco", name)
    (out / "masks").mkdir(parents=True)  # so that ../../victim from out/masks is tmp_path/victim
    before = _digests(victim, root)
    res = runner.invoke(app, ["label", str(root), "--dataset", "coco", "--out", str(out), "--model", str(model),
                              "--device", "cpu", "--workers", "0"])
    _clear_error(res, "images[0] file_name", repr(name), "not a name inside")
    assert _digests(victim, root) == before
    assert not list(out.rglob("*.png")) and not (out / "manifest.json").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_label_labels_inside_out_is_refused(tmp_path, photos, model, overwrite):
    """``--labels OUT/labels.json`` was replaced by the run's labels.json (and deleted first by --overwrite)."""
    out = tmp_path / "out"
    out.mkdir()
    labels = out / "labels.json"
    labels.write_text(json.dumps({"a": ["cat"], "b": ["bottle"]}))
    before = _digests(labels, photos)
    res = runner.invoke(app, ["label", str(photos), "--out", str(out), "--labels", str(labels), "--model",
                              str(model), "--device", "cpu", "--workers", "0", *overwrite])
    _clear_error(res, f"--labels {labels} is inside --out {out}, which clipes writes")
    assert _digests(labels, photos) == before and sorted(p.name for p in out.iterdir()) == ["labels.json"]


def _labels_json(tmp_path: Path) -> Path:
    f = tmp_path / "gt.json"
    f.write_text(json.dumps({"a": ["cat"], "b": ["bottle", "diningtable"]}))
    return f


@pytest.mark.parametrize(("case", "expect"), [
    ("tag --out F --gt F", "--out {F} is --gt {F}, an input"),
    ("tag --out F --classes F", "--out {F} is --classes {F}, an input"),
    ("tag --out G --metrics G --gt F", "--metrics {G} and --out {G} are one place"),
    ("prompts rank --out F --labels F", "--out {F} is --labels {F}, an input"),
    ("prompts rank --out O --labels F --classes C --write-class-set C", "--write-class-set {C} is --classes {C}"),
])
def test_a_file_a_command_writes_is_never_one_of_its_inputs(tmp_path, photos, model, case, expect):
    """Each replaced an input with exit 0: the ground truth, the class set, the tags, the labels."""
    f = _labels_json(tmp_path)
    c = tmp_path / "mine.yaml"
    c.write_text("classes: [cat, bottle, diningtable]\n")
    paths = {"F": f, "G": tmp_path / "tags.json", "C": c, "O": tmp_path / "rank.json"}
    args = [str(paths.get(word, word)) for word in case.split()]
    if args[0] == "tag" and "--classes" in args:
        (tmp_path / "mine.yaml").unlink()
        c = f  # the class set is the file written
        f.write_text("cat\nbottle\n")
    before = _digests(f, c, photos)
    command = args[:2] if args[0] == "prompts" else args[:1]
    res = runner.invoke(app, [*command, str(photos), *args[len(command):], "--model", str(model), "--device", "cpu",
                              "--workers", "0"])
    _clear_error(res, expect.format(**{k: str(v) for k, v in paths.items()}))
    assert _digests(f, c, photos) == before and not (tmp_path / "rank.json").exists()


def test_eval_json_into_the_ground_truth_is_refused(tmp_path):
    """``eval --json GT/x.png`` replaced a ground-truth mask with the scores."""
    mask = np.zeros((6, 8), np.uint8)
    mask[2:5, 3:7] = 8
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        Image.fromarray(mask).save(tmp_path / folder / "x.png")
    gt = tmp_path / "gt"
    before = _digests(gt, tmp_path / "pred")
    res = runner.invoke(app, ["eval", str(tmp_path / "pred"), str(gt), "--json", str(gt / "x.png")])
    _clear_error(res, f"--json {gt / 'x.png'} is inside GT {gt}")
    res = runner.invoke(app, ["eval", str(tmp_path / "pred"), str(gt), "--plot", str(tmp_path / "pred" / "x.png")])
    _clear_error(res, "--plot", "is inside PRED")
    assert _digests(gt, tmp_path / "pred") == before


# ---------------------------------------------------------------- item 2: --split-file honoured, each image once

def test_label_split_file_without_dataset_is_honoured_and_names_an_image_once(tmp_path, photos, model):
    """It was ignored (every image labelled); a name listed three times labelled the image three times."""
    split = tmp_path / "take.txt"
    split.write_text("a\na.png\nsub/a\n")
    out = tmp_path / "out"
    before = _digests(photos, split)
    res = runner.invoke(app, ["label", str(photos), "--out", str(out), "--split-file", str(split), "--tagger",
                              "global", "--model", str(model), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "labelled 1 image(s)" in _said(res) and "names 2 image(s) again; each is labelled once" in _said(res)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]
    assert len((out / ".clipes" / "records.jsonl").read_text().splitlines()) == 1
    assert _digests(photos, split) == before
    split.write_text("a\nnope\n")
    _clear_error(runner.invoke(app, ["label", str(photos), "--out", str(tmp_path / "o2"), "--split-file", str(split),
                                     "--model", str(model), "--device", "cpu"]), "--split-file", "nope")


# ---------------------------------------------------------------- item 4: any class set, evaluated and viewed

def test_a_run_with_a_class_set_file_is_evaluated_and_viewed_from_its_manifest(tmp_path):
    """``eval`` and ``view --gt`` stopped with "field 'name' must be a string, not None"."""
    from clipes.prompts import load_class_set
    from clipes.run import LabelConfig, _settings

    mine = tmp_path / "pets.txt"
    mine.write_text("cat\ndog\nbird\n")
    settings = _settings(LabelConfig(images=tmp_path, out=tmp_path / "run", classes=str(mine)),
                         load_class_set(mine), None, "float32")  # as clipes label records them
    run = tmp_path / "run"
    mask = np.zeros((6, 8), np.uint8)
    mask[2:5, 3:7] = 2
    (run / "masks").mkdir(parents=True)
    Image.fromarray(mask).save(run / "masks" / "a.png")
    (run / "manifest.json").write_text(json.dumps({"input": str(tmp_path), "settings": settings}))
    (run / "labels.json").write_text(json.dumps({"a": {"labels": ["dog"], "source": "given", "file": "a.png"}}))
    (tmp_path / "gt").mkdir()
    Image.fromarray(mask).save(tmp_path / "gt" / "a.png")
    res = runner.invoke(app, ["eval", str(run), str(tmp_path / "gt")])
    assert res.exit_code == 0, res.output
    scores = json.loads((run / "eval.json").read_text())
    assert list(scores["classes"]) == ["background", "cat", "dog", "bird"] and scores["miou"] == 1.0
    res = runner.invoke(app, ["view", str(run), "--gt", str(tmp_path / "gt")])
    assert res.exit_code == 0, res.output
    assert (run / "view" / "index.html").is_file()


# ---------------------------------------------------------------- item 6: float images

def test_a_float_tiff_in_0_1_is_read_as_0_255_and_another_range_refused(tmp_path):
    """A float TIFF in [0, 1] was read as almost black (divided by 255 again)."""
    from clipes.images import ImageError, read_image

    ramp = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    got = np.asarray(read_image(tmp_path / "unit.tif"))
    np.testing.assert_array_equal(got, np.rint(ramp.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(ramp * 300, "F").save(tmp_path / "wide.tif")
    with pytest.raises(ImageError, match=r"wide.tif: .*float samples in \[0, 300\]"):
        read_image(tmp_path / "wide.tif")


# ---------------------------------------------------------------- smaller

def test_a_malformed_yaml_class_set_is_one_line(tmp_path, photos, model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [cat, dog\nname: x\n")
    res = runner.invoke(app, ["label", str(photos), "--out", str(tmp_path / "out"), "--classes", str(bad), "--model",
                              str(model)])
    _clear_error(res, str(bad), "invalid YAML")
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
