"""train-seg and segment under hostile input: every mistake a one-line error (exit 2), no silent mix."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app
from clipes.segment.checkpoint import VERSION, rebuild_vision, vision_spec
from clipes.segment.train import load_checkpoint

from .conftest import lock_held_elsewhere, make_tiny_openclip
from .synthetic import make_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("seg"), n_train=8, n_val=3, size=32)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"), "--classes",
            str(data / "classes.txt"), "--model", "tiny", "--steps", "2", "--batch-size", "4", "--crop", "32",
            "--workers", "0", "--device", "cpu", "--val-every", "100", "--out", str(out), *extra]


def _fails(res, *words: str) -> str:
    """The command ended with one clear message (exit 2, no traceback) containing ``words``; a progress bar
    may precede it."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "\nerror:" in "\n" + res.output, res.output
    said = " ".join(res.output[res.output.rindex("error:"):].split())
    for w in words:
        assert w in said, said
    return said


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "seg"
    res = runner.invoke(app, _args(data, out))
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize(("flag", "value"), [("--steps", "0"), ("--batch-size", "0"), ("--crop", "0"),
                                             ("--steps", "-3"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"),
                                             ("--lr", "inf"), ("--weight-decay", "nan"), ("--workers", "-1"),
                                             ("--val-every", "0"), ("--accumulate", "0"), ("--stop-at", "0")])
def test_meaningless_numbers_are_refused_naming_the_flag(data, tmp_path, flag, value):
    args = [a for a in _args(data, tmp_path / "o") if a]
    if flag in args:
        i = args.index(flag)
        args[i + 1] = value
    else:
        args += [flag, value]
    _fails(runner.invoke(app, args), flag, value)
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize(("text", "words"), [("lr: fast\n", ["lr", "'fast'"]), ("steps: 0\n", ["steps"]),
                                             ("crop: 1.5\n", ["crop"]), ("bf16: maybe\n", ["bf16"]),
                                             ("scales: [0.5, 0]\n", ["scales"]), ("- lr\n", ["mapping"])])
def test_config_file_values_are_checked_naming_file_and_key(data, tmp_path, text, words):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    _fails(runner.invoke(app, [*_args(data, tmp_path / "o"), "--config", str(cfg)]), str(cfg), *words)


def test_whole_numbers_written_as_floats_in_a_config_file_are_whole_numbers(data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 2.0\nbatch_size: 4.0\ncrop: 32.0\n")
    args = _args(data, tmp_path / "o", "--config", str(cfg))
    for flag in ("--steps", "--batch-size", "--crop"):  # from the file only
        i = args.index(flag)
        del args[i:i + 2]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "o" / "last.pt")["step"] == 2


def test_nothing_is_written_before_the_model_is_built(data, tmp_path):
    args = _args(data, tmp_path / "o", "--backbone-weights", str(tmp_path / "missing.pth"))
    args[args.index("--model") + 1] = "deeplabv3-resnet50"
    _fails(runner.invoke(app, args), "--backbone-weights", "missing.pth")
    assert not (tmp_path / "o").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_anything_is_written(data, tmp_path):
    """Under torchrun (here a stand-in rank 0 of 3): --batch-size 4 cannot split over 3 processes."""
    from contextlib import ExitStack

    from rich.console import Console

    from clipes.distributed import DistInfo
    from clipes.errors import ClipesError
    from clipes.segment.train import TrainConfig, _train

    cfg = TrainConfig(out=str(tmp_path / "o"), images=str(data / "images"), masks=str(data / "noisy"),
                      classes=str(data / "classes.txt"), model="tiny", steps=2, batch_size=4, crop=32, workers=0,
                      device="cpu").resolved()
    with ExitStack() as held, pytest.raises(ClipesError, match="--batch-size 4 .*3 process"):
        _train(cfg, Console(quiet=True), torch.device("cpu"), DistInfo(0, 3), held)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scales", ["0", "-1", "nan", "1,x", ""])
def test_segment_scales_are_checked(run, data, tmp_path, scales):
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(run / "last.pt"), "--out",
                              str(tmp_path / "p"), "--scales", scales, "--device", "cpu"])
    _fails(res, "--scales")


def test_train_seg_refuses_an_existing_run_unless_resume_or_overwrite(data, run, tmp_path):
    out = tmp_path / "seg"
    shutil.copytree(run, out)
    best_before = (out / "last.pt").read_bytes()
    _fails(runner.invoke(app, _args(data, out)), "already holds a training run", "--resume", "--overwrite")
    assert (out / "last.pt").read_bytes() == best_before
    res = runner.invoke(app, _args(data, out, "--overwrite", "--seed", "1"))
    assert res.exit_code == 0, res.output
    log = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [2]  # a new log, not appended to the old one
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1


def test_resume_without_a_checkpoint_is_an_error(data, tmp_path):
    _fails(runner.invoke(app, _args(data, tmp_path / "new", "--resume")), "--resume", "last.pt", "not found")


def test_resume_with_another_class_set_is_an_error(data, run, tmp_path):
    out = tmp_path / "seg"
    shutil.copytree(run, out)
    other = tmp_path / "classes.txt"
    other.write_text("disc\nsquare\ntriangle\n")
    args = _args(data, out, "--resume")
    args[args.index("--classes") + 1] = str(other)
    args[args.index("--steps") + 1] = "4"
    _fails(runner.invoke(app, args), "--resume", "another class set")


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", b"PK\x03\x04truncated"])
def test_garbage_checkpoints_are_clear_errors(data, run, tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(bad), "--out",
                              str(tmp_path / "p"), "--device", "cpu"])
    assert "Aborted" not in res.output
    _fails(res, str(bad), "cannot read checkpoint")
    out = tmp_path / "seg"
    shutil.copytree(run, out)
    (out / "last.pt").write_bytes(content)
    args = _args(data, out, "--resume")
    args[args.index("--steps") + 1] = "4"
    _fails(runner.invoke(app, args), "last.pt", "cannot read checkpoint")


def test_checkpoint_format_versions(data, run, tmp_path):
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["version"] == VERSION and ckpt["arch"]["model"] == "tiny"
    newer = tmp_path / "newer.pt"
    torch.save({**ckpt, "version": VERSION + 1}, newer)
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(newer), "--out",
                              str(tmp_path / "p"), "--device", "cpu"])
    _fails(res, str(newer), "newer clipes", f"format {VERSION + 1}")
    older = tmp_path / "older.pt"  # format 1: clipes before the version field
    torch.save({k: v for k, v in ckpt.items() if k not in ("format", "version", "arch")}, older)
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(older), "--out",
                              str(tmp_path / "p1"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(tmp_path / "foreign.pt"),
                              "--out", str(tmp_path / "p2"), "--device", "cpu"])
    _fails(res, "not a clipes train-seg checkpoint")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_mask_values_above_the_class_count_name_the_mask(data, tmp_path, workers):
    masks = tmp_path / "masks"
    shutil.copytree(data / "noisy", masks)
    bad = np.asarray(Image.open(masks / "003.png")).copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(masks / "003.png")
    args = _args(data, tmp_path / "o", "--steps", "4")
    args[args.index("--masks") + 1] = str(masks)
    args[args.index("--workers") + 1] = workers
    said = _fails(runner.invoke(app, args), str(masks / "003.png"), "7", "2-class set")
    assert "worker" not in said  # a DataLoader worker's error comes out as its own line
    assert said.count("error:") == 1 and len(said) < 300


def _tiny_clip_file(path: Path) -> Path:
    torch.save(make_tiny_openclip(seed=3, image=32).state_dict(), path)
    return path


def test_a_checkpoint_is_self_contained(data, tmp_path, monkeypatch):
    """segment needs neither the CLIP file of training nor the folder it was run from."""
    clip = _tiny_clip_file(tmp_path / "clip.pt")
    monkeypatch.chdir(tmp_path)
    args = _args(data, Path("seg"), "--clip-model", "clip.pt")
    args[args.index("--model") + 1] = "clip-linear"
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ckpt = torch.load("seg/last.pt", weights_only=True)
    assert ckpt["arch"]["clip_vision"]["width"] == 64 and ckpt["arch"]["clip_vision"]["quick_gelu"]
    first = tmp_path / "pred1"
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", "seg/last.pt", "--out",
                              str(first), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    clip.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("CLIPES_MODEL", "/nonexistent/clip.pt")
    second = tmp_path / "pred2"
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(tmp_path / "seg" / "last.pt"),
                              "--out", str(second), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for png in sorted(first.glob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(second / png.name)))
    assert len(list(second.glob("*.png"))) == 3


def _segment(data: Path, images: Path, ckpt: Path, out: Path, *extra: str):
    return runner.invoke(app, ["segment", str(images), "--checkpoint", str(ckpt), "--out", str(out), "--device",
                               "cpu", *extra])


def test_segment_refuses_a_folder_made_with_another_checkpoint_or_settings(data, run, tmp_path):
    out = tmp_path / "pred"
    assert _segment(data, data / "val_images", run / "last.pt", out).exit_code == 0
    other = tmp_path / "other"
    res = runner.invoke(app, _args(data, other, "--seed", "5"))
    assert res.exit_code == 0, res.output
    _fails(_segment(data, data / "val_images", other / "last.pt", out), "other settings", "checkpoint", "--overwrite")
    _fails(_segment(data, data / "val_images", run / "last.pt", out, "--flip"), "other settings", "flip")
    copy = tmp_path / "copy.pt"  # the same checkpoint elsewhere is the same model
    shutil.copy(run / "last.pt", copy)
    res = _segment(data, data / "val_images", copy, out)
    assert res.exit_code == 0 and "0 image(s), 3 already done" in " ".join(res.output.split()), res.output
    res = _segment(data, data / "val_images", other / "last.pt", out, "--overwrite")
    assert res.exit_code == 0 and "segmented 3 image(s)" in " ".join(res.output.split()), res.output


def test_segment_redoes_changed_inputs_and_overwrite_removes_stale_predictions(data, run, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data / "val_images", images)
    out = tmp_path / "pred"
    assert _segment(data, images, run / "last.pt", out).exit_code == 0
    # replace one image in place by another picture of the same name
    shutil.copy(data / "images" / "005.png", images / "001.png")
    os.utime(images / "001.png", ns=(1, 1))
    res = _segment(data, images, run / "last.pt", out)
    assert res.exit_code == 0 and "segmented 1 image(s), 2 already done" in " ".join(res.output.split()), res.output
    expected = tmp_path / "expected"
    assert _segment(data, data / "images", run / "last.pt", expected).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "001.png")), np.asarray(Image.open(expected / "005.png")))
    (images / "002.png").unlink()
    assert _segment(data, images, run / "last.pt", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png"]


def test_help_texts_render_fully():
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    train = " ".join(runner.invoke(app, ["train-seg", "--help"], env=wide).output.split())
    for words in ("Training split [train]", "Validation split [val]", "Class set: voc, coco or a file [voc]",
                  "[clip-linear]", "Weight decay [preset", "Random seed [0]", "DataLoader processes [2]",
                  "auto, cpu or cuda [auto]"):
        assert words in train, words
    seg = runner.invoke(app, ["segment", "--help"], env=wide).output
    for flag in ("--flip", "--overwrite", "--resume"):
        assert f"{flag} <bool>" not in " ".join(seg.split()) and f"{flag} <bool>" not in train
    assert "--flip" in seg


def test_a_second_writer_is_refused(data, run, tmp_path):
    out = tmp_path / "seg"
    with lock_held_elsewhere(out) as (holder, _):
        _fails(runner.invoke(app, _args(data, out)), f"being written by another clipes run (pid {holder.pid})")
        assert not (out / "last.pt").exists()
    pred = tmp_path / "pred"
    with lock_held_elsewhere(pred):
        _fails(runner.invoke(app, ["segment", str(data / "images"), "--checkpoint", str(run / "last.pt"),
                                   "--out", str(pred), "--device", "cpu"]), "being written by another clipes run")
        assert not list(pred.glob("*.png"))
    res = runner.invoke(app, ["segment", str(data / "images"), "--checkpoint", str(run / "last.pt"), "--out",
                              str(pred), "--device", "cpu"])
    assert res.exit_code == 0, res.output  # the lock goes with the process that held it


def test_confidence_from_a_run_without_the_crf_says_so(data, tmp_path):
    """A --refine par (or plain) run saves CAMs without a CRF confidence: say what --confidence needs."""
    run_dir = tmp_path / "par_run"
    (run_dir / "cams").mkdir(parents=True)
    for img in (data / "images").glob("*.png"):
        np.savez(run_dir / "cams" / f"{img.stem}.npz", labels=np.zeros(1, np.int64),
                 cam_refined=np.zeros((1, 32, 32), np.float32))
    _fails(runner.invoke(app, _args(data, tmp_path / "o", "--confidence", str(run_dir))),
           "holds no CRF confidence", "--crf --save-cams")


def test_an_out_that_is_a_file_is_refused(data, run, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _fails(runner.invoke(app, _args(data, f)), "--out", "is a file")
    _fails(runner.invoke(app, ["segment", str(data / "images"), "--checkpoint", str(run / "last.pt"),
                               "--out", str(f / "pred"), "--device", "cpu"]), "cannot be made", "is a file")


# ---------------------------------------------------------------- issue 19: the third hostile trial

def _digests(*roots: Path) -> dict[str, str]:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_config_inside_out_is_refused(data, run, tmp_path):
    """``--config OUT/config.yaml`` was replaced by the run's own config.yaml."""
    out = tmp_path / "seg"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.001\n")
    before = _digests(out, data)
    _fails(runner.invoke(app, [*_args(data, out), "--config", str(out / "config.yaml")]),
           f"--config {out / 'config.yaml'} is inside --out {out}, which clipes writes")
    assert _digests(out, data) == before


def test_confidence_naming_a_folder_without_confidence_maps_is_refused(data, tmp_path):
    """``--confidence /missing`` (or a run without cams/) trained unweighted, exit 0."""
    for folder in (tmp_path / "missing", data):
        _fails(runner.invoke(app, _args(data, tmp_path / "o", "--confidence", str(folder))),
               f"--confidence {folder}: 8 of 8 training image(s) have no saved confidence")
        assert not (tmp_path / "o").exists()


def test_resume_with_other_settings_is_refused_naming_each_unless_allowed(data, run, tmp_path):
    """``--resume`` with another --lr/--steps was accepted and config.yaml rewritten."""
    out = tmp_path / "seg"
    shutil.copytree(run, out)
    before = _digests(out)
    said = _fails(runner.invoke(app, _args(data, out, "--resume", "--steps", "3", "--lr", "0.5")),
                  "--resume:", "other settings", "lr 0.0001 -> 0.5", "steps 2 -> 3", "--allow-changes")
    assert "workers" not in said and _digests(out) == before
    _fails(runner.invoke(app, _args(data, tmp_path / "new", "--allow-changes")), "--allow-changes goes with --resume")
    res = runner.invoke(app, _args(data, out, "--resume", "--steps", "3", "--allow-changes"))
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and log[1]["changed"] == {"steps": [2, 3]} and "changed" not in log[0]


def test_a_resumed_log_holds_each_step_once_and_a_finished_run_its_loss(data, tmp_path):
    """After a kill and --resume, log.jsonl held the steps the killed run logged after its checkpoint twice;
    a resumed run with nothing left to do printed ``loss nan``."""
    out = tmp_path / "seg"
    assert runner.invoke(app, _args(data, out, "--steps", "4", "--stop-at", "2")).exit_code == 0
    with (out / "log.jsonl").open("a") as f:  # a run killed after logging step 3, before saving it
        f.write(json.dumps({"step": 3, "loss": 9.0, "lr": 0.1}) + "\n" + '{"step": 4, "lo')
    res = runner.invoke(app, _args(data, out, "--steps", "4", "--resume"))
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and 9.0 not in [r["loss"] for r in log]
    res = runner.invoke(app, _args(data, out, "--steps", "4", "--resume"))
    assert res.exit_code == 0 and f"step 4, loss {log[-1]['loss']:.4f}" in res.output, res.output


@pytest.mark.parametrize("seed", [str(2**32), str(2**70)])
def test_a_seed_numpy_cannot_take_is_refused_first(data, tmp_path, seed):
    _fails(runner.invoke(app, _args(data, tmp_path / "o", "--seed", seed)), "--seed", seed, "2**32")
    assert not (tmp_path / "o").exists()


def test_host_out_of_memory_says_the_batch_to_use(data, tmp_path, monkeypatch):
    """A batch that does not fit in host memory was a MemoryError traceback after minutes."""
    import clipes.segment.train as seg_train

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 93312000000 bytes")

    monkeypatch.setattr(seg_train, "segmentation_loss", no_memory)  # the loss train.py calls
    _fails(runner.invoke(app, _args(data, tmp_path / "o")), "out of host memory", "--batch-size 4",
           "use --accumulate 2 (the same --batch-size 4 in parts of 2")


@pytest.mark.parametrize("scales", ["0.5,1", "0.01,1"])
def test_segment_a_tiny_image_at_a_small_scale_is_predicted(data, run, tmp_path, scales):
    """A 1x1 image at 0.5 (or any image at 0.01): "Input and output sizes should be greater than 0" aborted."""
    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(images / "dot.png")
    before = _digests(images)
    res = runner.invoke(app, ["segment", str(images), "--checkpoint", str(run / "last.pt"), "--out",
                              str(tmp_path / "pred"), "--device", "cpu", "--scales", scales])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "pred" / "dot.png").size == (1, 1)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 9 and _digests(images) == before


@pytest.mark.parametrize("width, mlp_width", [(88, 120), (64, 256)])
def test_a_recorded_vision_layout_rebuilds_exactly(width, mlp_width):
    """open_clip sizes the MLP as int(width * mlp_ratio): from the ratio 120 / 88 it builds 119 units, so the
    checkpoint records the MLP width; a spec from before it (ratio only) rebuilds the same."""
    import open_clip

    cfg = open_clip.CLIPVisionCfg(layers=2, width=width, head_width=width // 2, mlp_ratio=(mlp_width + 0.5) / width,
                                  patch_size=16, image_size=32)
    visual = open_clip.model._build_vision_tower(24, cfg)
    assert visual.transformer.resblocks[0].mlp.c_fc.out_features == mlp_width
    spec = vision_spec(visual)
    old = {k: v for k, v in spec.items() if k != "mlp_width"}
    for recorded in (spec, old):
        rebuilt = rebuild_vision(recorded)
        rebuilt.load_state_dict(visual.state_dict())  # the same shapes everywhere
        assert rebuilt.transformer.resblocks[0].mlp.c_fc.out_features == mlp_width
