"""A new user's first hour (issue 18): fast --help, output that scripts and logs can read, true help texts,
the flags the messages name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

COMMANDS = [[], ["label"], ["eval"], ["view"], ["export"], ["tag"], ["prompts"], ["prompts", "rank"],
            ["prompts", "show"], ["train-seg"], ["segment"]]


def _clipes(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m clipes ARGS`` in a fresh process, its output a pipe (not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "clipes", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


_PROBE = """
import sys
from clipes.cli import main
sys.argv = ["clipes", *{args!r}]
try:
    main()
except SystemExit as e:
    code = e.code
print("EXIT", code, sorted(m for m in ("torch", "open_clip", "torchvision") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [[*c, "--help"] for c in COMMANDS] + [
    ["label", "--bogus"], ["label", "IMAGES", "--bg-power", "nan"], ["label", "IMAGES", "--device", "tpu"],
    ["tag", "--max-side", "3"], ["eval"], ["train-seg", "--steps", "x"], ["segment", "IMAGES"],
    ["prompts", "rank", "--batch-size", "0"], ["view", "RUN", "--limit", "0"]])
def test_help_and_usage_errors_come_back_before_torch_loads(tmp_path, args):
    """torch and open_clip take seconds to import (about 4 s on a quiet machine, 25 s under load here):
    --help and mistakes in the command line must not wait for them."""
    res = subprocess.run([sys.executable, "-c", _PROBE.format(args=args)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("EXIT"), res.stderr
    code = last.split()[1]
    assert code in (("0", "None") if "--help" in args else ("2",)), res.stderr
    assert last.endswith("[]"), f"{args}: {last}"


def test_importing_clipes_loads_nothing_heavy_until_used():
    res = subprocess.run([sys.executable, "-c", "import sys, clipes; print('torch' in sys.modules); "
                          "from clipes import Labeler, load_class_set; print('torch' in sys.modules, Labeler.__name__, "
                          "load_class_set('voc').name)"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.stdout.split() == ["False", "True", "Labeler", "voc"], res.stderr


def test_help_into_a_pipe_cuts_no_default_short(tmp_path):
    res = _clipes("prompts", "rank", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "prompt_ranking.json]" in res.stdout and "…" not in res.stdout


def test_output_that_is_not_a_terminal_is_not_wrapped(tmp_path, monkeypatch):
    """A long --json path stays whole on the final line, and a long title whole above its table."""
    monkeypatch.delenv("COLUMNS", raising=False)
    pred, gt = tmp_path / ("predictions-of-a-segmenter-" * 4), tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 15
    Image.fromarray(mask).save(gt / "a.png")
    Image.fromarray(mask).save(pred / "a.png")
    target = tmp_path / ("a-rather-long-folder-name-" * 4) / "scores-of-the-first-run-against-ground-truth.json"
    res = runner.invoke(app, ["eval", str(pred), str(gt), "--json", str(target)])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert len(str(target)) > 120 and last == f"mIoU 100.00% -> {target}", res.output
    assert f"1 image(s), {pred}" in [line.strip() for line in res.output.splitlines()], res.output
    assert json.loads(target.read_text())["miou"] == 1.0


# ---------------------------------------------------------------- the flags messages name


def test_train_seg_names_clip_model_for_missing_clip_weights():
    from clipes.errors import ClipesError
    from clipes.segment import build_segmenter
    from clipes.segment.config import ConfigError, TrainConfig

    with pytest.raises(ClipesError, match="Pass --clip-model with a local checkpoint") as err:
        build_segmenter("clip-linear", 3, clip_model="/nonexistent/ViT-B-16.pt")
    assert "--model" not in str(err.value).replace("--clip-model", "")
    with pytest.raises(ConfigError, match="unknown model '/w/ViT-B-16.pt'.*go to --clip-model"):
        TrainConfig(model="/w/ViT-B-16.pt").resolved()


def test_train_seg_help_names_the_model_variable(tmp_path):
    res = _clipes("train-seg", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "$CLIPES_MODEL" in res.stdout, res.stdout


def test_tag_zero_shot_threshold(tmp_path, golden):
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((64, 48)).save(images / "chelsea.png")
    out = tmp_path / "tags.json"
    args = ["tag", str(images), "--out", str(out), "--model", model, "--device", "cpu"]
    res = runner.invoke(app, [*args, "--tagger", "global", "--zero-shot-threshold", "0.99"])
    assert res.exit_code == 0, res.output
    entry = json.loads(out.read_text())["chelsea.png"]
    assert entry["threshold"] == 0.99
    best = max(entry["scores"], key=entry["scores"].get)
    assert entry["labels"] == [best] and entry["scores"][best] < 0.99  # none passes: the best class is kept
    out.unlink()
    res = runner.invoke(app, [*args, "--zero-shot-threshold", "0.3"])  # the default tagger is TagCLIP
    assert res.exit_code == 2 and "--zero-shot-threshold goes with --tagger global" in res.output
    res = runner.invoke(app, [*args, "--tagger", "global", "--zero-shot-threshold", "1.5"])
    assert res.exit_code == 2 and "1.5 is not in [0, 1]" in res.output and not out.exists()


# ---------------------------------------------------------------- what the files record


@pytest.mark.parametrize("tagger", ["tagclip", "global"])
@pytest.mark.parametrize("n_labels", [1, 5, 8])
def test_labels_json_records_each_label_and_five_other_classes(voc, tagger, n_labels):
    """labels.json's scores: the image's labels and the best five other classes, also with many labels
    (TagCLIP recorded no other class once an image had five labels; the global tagger dropped labels)."""
    from types import SimpleNamespace

    import torch

    from clipes.tagging import TAGGERS

    scores = torch.linspace(0.05, 0.95, len(voc)).flip(0)  # class 0 best
    labels = list(range(n_labels))
    recorded = TAGGERS[tagger].record(SimpleNamespace(class_set=voc), scores, labels)
    names = list(recorded)
    assert names[:n_labels] == [voc.classes[i] for i in labels]
    assert names[n_labels:] == [voc.classes[i] for i in range(n_labels, n_labels + 5)]
    assert recorded[voc.classes[0]] == pytest.approx(0.95, abs=1e-6)


def test_train_seg_names_the_checkpoint_to_segment_with(tmp_path):
    from .synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_train=8, n_val=2, size=32)
    base = ["train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"), "--classes",
            str(data / "classes.txt"), "--model", "tiny", "--steps", "2", "--batch-size", "2", "--crop", "32",
            "--workers", "0", "--device", "cpu"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert f"no validation set -> {tmp_path / 'plain' / 'last.pt'}" in res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["checkpoint"] == str(tmp_path / "plain" / "last.pt")
    assert not (tmp_path / "plain" / "best.pt").exists()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "val"), "--val-images", str(data / "val_images"),
                              "--val-masks", str(data / "val_masks")])
    assert res.exit_code == 0, res.output
    # the checkpoint to report is the last (deeplab-pytorch's rule); best.pt is selected on val, and said so
    assert f" -> {tmp_path / 'val' / 'last.pt'}" in res.output and (tmp_path / "val" / "best.pt").is_file()
    assert "selected on the validation set" in " ".join(res.output.split())
    reported = json.loads(res.stdout.strip().splitlines()[-1])
    assert reported["checkpoint"] == str(tmp_path / "val" / "last.pt")
    assert reported["best_checkpoint"] == str(tmp_path / "val" / "best.pt")


def test_eval_counts_predictions_without_ground_truth(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 15
    for stem in ("a", "b", "c"):
        Image.fromarray(mask).save(pred / f"{stem}.png")
    Image.fromarray(mask).save(gt / "a.png")
    res = runner.invoke(app, ["eval", str(pred), str(gt), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "2 prediction(s) have no ground truth (not scored): b, c" in " ".join(res.output.split())
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["images"] == 1 and report["without_ground_truth"] == ["b", "c"]


def test_label_help_says_what_happens():
    res = runner.invoke(app, ["label", "--help"], env={"COLUMNS": "1000"})
    said = " ".join(res.output.replace("│", " ").split())
    assert "crf (the reference's dense CRF; see --crf-backend)" in said and "on the CPU)" not in said
    assert "inferred by --tagger (TagCLIP by default)" in said and "zero-shot." not in said
