"""A new user's first hour, fourth pass (issue 32): --dtype auto from what the CPU is, mistakes answered before
torch loads, no torch where no model runs, help texts from the presets, hints in the right order."""

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

# torch, torchvision and open_clip as if not installed: an import raises ImportError and find_spec says None,
# so a command that passes here needs none of them
_WITHOUT_TORCH = """
import sys
for name in ("torch", "torchvision", "open_clip"):
    sys.modules[name] = None
from clipes.cli import main
sys.argv = ["clipes", *{args!r}]
try:
    main()
except SystemExit as e:
    sys.exit(e.code)
"""


def without_torch(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``clipes ARGS`` in a fresh process where torch cannot be imported, output a pipe."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    environ.update(env or {}, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH.format(args=[str(a) for a in args])], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=environ)


# 1. --dtype auto from the CPU's units, never a timing

def test_auto_follows_the_cpu_flags_and_never_times(monkeypatch, tmp_path):
    from clipes import precision

    monkeypatch.delenv(precision.DTYPE_ENV, raising=False)

    def no_timing(dtype):
        raise AssertionError("auto must not time anything")

    monkeypatch.setattr(precision, "cpu_matmul_speedup", no_timing)
    amx = precision.resolve_dtype("auto", "cpu", flags=("amx_bf16",))
    assert amx.name == "bfloat16" and "amx_bf16" in amx.reason
    assert precision.resolve_dtype(None, "cpu", flags=("avx512_bf16",)).name == "bfloat16"
    plain = precision.resolve_dtype(None, "cpu", flags=())
    assert plain.name == "float32" and "no bf16 matrix unit" in plain.reason
    assert precision.resolve_dtype(None, "cuda:0").name == "bfloat16"
    assert precision.slow_low_precision(amx, "cpu") is None  # auto's choice is never measured
    # the flags come from the kernel's report, the same on every call
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_bf16_flags(info) == ()
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert precision.cpu_bf16_flags(info) == ("amx_bf16", "avx512_bf16")
    assert precision.cpu_bf16_flags(tmp_path / "absent") == ()


def test_auto_is_the_same_on_every_run_and_says_why(monkeypatch):
    """Twenty decisions in a row all alike, and the one this CPU's flags give (the timing gave float32 once
    and bf16 the next on a shared CPU)."""
    from clipes import precision

    monkeypatch.delenv(precision.DTYPE_ENV, raising=False)
    choices = {precision.resolve_dtype("auto", "cpu") for _ in range(20)}
    assert len(choices) == 1
    (choice,) = choices
    assert choice.name == ("bfloat16" if precision.cpu_bf16_flags() else "float32")


def test_an_asked_low_precision_is_still_measured(monkeypatch):
    from clipes import precision

    monkeypatch.setattr(precision, "cpu_matmul_speedup", lambda dtype: 0.65)
    asked = precision.resolve_dtype("bfloat16", "cpu")
    assert "0.65x" in precision.slow_low_precision(asked, "cpu")


# 3. commands that run no model import no torch

@pytest.fixture(scope="module")
def run(tmp_path_factory, golden) -> Path:
    """A small labelled run with saved CAMs (made in this process, with torch)."""
    root = tmp_path_factory.mktemp("fourth")
    photos = root / "photos"
    photos.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((96, 64)).save(photos / "chelsea.png")
    Image.open(golden / "images" / "coffee.png").resize((80, 64)).save(photos / "coffee.png")
    labels = root / "labels.json"
    labels.write_text(json.dumps({"chelsea": ["cat"], "coffee": ["diningtable", "bottle"]}))
    res = runner.invoke(app, ["label", str(photos), "--out", str(root / "run"), "--labels", str(labels), "--model",
                              str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu", "--save-cams"])
    assert res.exit_code == 0, res.output
    return root / "run"


def test_commands_without_a_model_run_with_torch_unimportable(run, tmp_path):
    gt = run / "masks"  # the run's own masks as ground truth: a perfect score, whatever the masks are
    cases = {
        "prompts show": (["prompts", "show", "--classes", "coco"], lambda: None),
        "eval": (["eval", run, gt, "--json", tmp_path / "scores.json"], lambda: (tmp_path / "scores.json").is_file()),
        "eval power": (["eval", run, gt, "--search-bg-power", "1,2"], lambda: None),
        "eval threshold": (["eval", run, gt, "--search-bg-threshold", "0.3"], lambda: None),
        "view": (["view", run, "--gt", gt], lambda: (run / "view" / "index.html").is_file()),
        "export coco": (["export", run, "-f", "coco", "-o", tmp_path / "c.json", "--instances"],
                        lambda: (tmp_path / "c.json").is_file()),
        "export cvat": (["export", run, "-f", "cvat", "-o", tmp_path / "cvat.zip"],
                        lambda: (tmp_path / "cvat.zip").is_file()),
    }
    for name, (args, made) in cases.items():
        res = without_torch(*args, cwd=tmp_path)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        assert made() is not False, name
    shown = without_torch("prompts", "show", cwd=tmp_path).stdout.splitlines()
    assert shown[1] == "aeroplane\ta clean origami aeroplane."


def test_hf_export_imports_no_torch(run, tmp_path):
    """datasets' pickler takes a None in sys.modules for a loaded torch, so here torch stays importable and the
    test asks whether anything imported it."""
    pytest.importorskip("datasets")
    probe = ("import sys\nfrom clipes.cli import main\nsys.argv = ['clipes', 'export', sys.argv[1], '-f', 'hf', '-o', "
             "sys.argv[2]]\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe, str(run), str(tmp_path / "hf")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[-2] == "[]", res.stdout


def test_eval_of_saved_cams_in_numpy_is_torch_s_mask(run):
    """eval's masks from saved CAMs are now numpy's: the same masks as the engine's torch functions."""
    import torch

    from clipes.masks import pseudo_mask, pseudo_mask_np, threshold_mask, threshold_mask_np

    for path in sorted((run / "cams").glob("*.npz")):
        with np.load(path) as data:
            cams, labels = data["cam_refined"], data["labels"].astype(np.int64)
        for t in (1.0, 2.0, 0.5):
            want = pseudo_mask(torch.from_numpy(cams), torch.from_numpy(labels), t).numpy()
            np.testing.assert_array_equal(pseudo_mask_np(cams, labels, t), want)
        want = threshold_mask(torch.from_numpy(cams), torch.from_numpy(labels), 0.3).numpy()
        np.testing.assert_array_equal(threshold_mask_np(cams, labels, 0.3), want)
    empty = np.zeros((0, 4, 5), np.float32)
    assert not pseudo_mask_np(empty, np.zeros(0, np.int64)).any()


# 2. every check that needs no weights comes before torch

def _label_mistakes(run: Path, tmp_path: Path, golden: Path) -> list[tuple[list, str]]:
    photos, labels = run.parent / "photos", run.parent / "labels.json"
    ckpt = str(golden / "tiny-clip-vit-b16-random.pt")
    bad_labels = tmp_path / "bad.json"
    bad_labels.write_text('{"chelsea": ["unicorn"]}')
    base = ["label", photos, "--model", ckpt, "--device", "cpu", "--out", tmp_path / "new"]
    return [
        ([*base, "--refine", "crf", "--par-bg-high", "0.6"], "--par-bg-high needs --refine par, not --crf"),
        ([*base, "--crf", "--par-iterations", "3"], "--par-iterations needs --refine par, not --crf"),
        ([*base, "--confidence", "0.9"], "--confidence needs --crf"),
        ([*base, "--getam-start", "3"], "--getam-start needs --cam getam, not --cam gradcam"),
        ([*base, "--crf-backend", "torch"], "--crf-backend needs --crf"),
        ([*base, "--refine", "par", "--par-bg-high", "0.3", "--par-bg-low", "0.5"], "is above --par-bg-high"),
        ([*base, "--tagger", "nosuch"], "--tagger 'nosuch': choose one of tagclip, global"),
        (["label", photos, "--model", "/nonexistent/ViT-B-16.pt", "--out", tmp_path / "x"],
         "checkpoint file not found: /nonexistent/ViT-B-16.pt"),
        (["label", photos, "--model", "ViT-B-16:/nonexistent/w.safetensors", "--out", tmp_path / "x"],
         "checkpoint file not found: /nonexistent/w.safetensors"),
        ([*base[:-1], photos / "masks"], "--out"),
        ([*base, "--dtype", "float64"], "--dtype 'float64': choose auto"),
        ([*base, "--classes", tmp_path / "nosuch.yaml"], "nosuch.yaml"),
        ([*base, "--labels", bad_labels], "unicorn"),
        (["label", tmp_path / "no-images", "--model", ckpt, "--out", tmp_path / "x"], "does not exist"),
        ([*base, "--caa-blocks", "x"], "--caa-blocks"),
        # a resume the folder's manifest refuses
        (["label", photos, "--out", run, "--labels", labels, "--model", ckpt, "--device", "cpu", "--save-cams",
          "--bg-power", "2"], "holds a run made with other settings (bg_power)"),
        (["label", photos, "--out", run, "--labels", labels, "--model", ckpt, "--device", "cpu", "--save-cams",
          "--classes", "coco"], "other settings (box_threshold, classes)"),
        (["label", photos, "--out", run, "--model", ckpt, "--device", "cpu", "--save-cams"],
         "other settings (tagger)"),
        (["label", photos, "--out", run, "--labels", labels, "--model", ckpt, "--device", "cpu", "--save-cams",
          "--refine", "par"], "other settings (refiner)"),
    ]


def test_label_mistakes_are_answered_with_torch_unimportable(run, tmp_path, golden):
    """The issue's cases answered after 11 to 44 s, torch and the model loaded first; here torch cannot load."""
    for args, message in _label_mistakes(run, tmp_path, golden):
        res = without_torch(*args, cwd=tmp_path)
        assert res.returncode == 2, f"{args}: {res.stderr}"
        assert message in res.stderr and res.stderr.startswith("error:"), f"{args}: {res.stderr}"
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()


def test_a_missing_checkpoint_path_gets_no_hf_cache_hint(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "a.png")
    res = without_torch("label", tmp_path / "images", "--model", tmp_path / "weights.pt", cwd=tmp_path)
    assert "checkpoint file not found" in res.stderr and "Hugging Face" not in res.stderr
    assert "--model" in res.stderr and "CLIPES_MODEL" in res.stderr
    # the loader's own words (for callers of load_clip) say the same
    from clipes.model import ModelLoadError, load_clip

    for spec in (str(tmp_path / "weights.pt"), f"ViT-B-16:{tmp_path / 'w.safetensors'}"):
        with pytest.raises(ModelLoadError, match="checkpoint file not found") as err:
            load_clip(spec)
        assert "Hugging Face" not in str(err.value)


def test_a_rerun_with_nothing_to_do_loads_no_model(run, tmp_path, golden):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    res = without_torch("label", run.parent / "photos", "--out", run, "--labels", run.parent / "labels.json",
                        "--model", golden / "tiny-clip-vit-b16-random.pt", "--device", "cpu", "--save-cams",
                        cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "labelled 0 image(s)" in res.stderr and "2 already done" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # left as it is


def test_the_plan_decides_what_the_run_would(run, golden):
    """The torch-free shortcut and the full run agree: nothing to do for the same options (batch size shapes no
    mask); an option that shapes a method's settings and differs from the recorded one takes no shortcut, and
    the run decides (here: the threshold of a tagger that given labels leave unused, so still nothing to do)."""
    from dataclasses import replace

    from rich.console import Console

    from clipes.label_plan import LabelConfig, plan_label
    from clipes.run import label_folder

    quiet = Console(quiet=True)
    cfg = LabelConfig(images=run.parent / "photos", out=run, labels=run.parent / "labels.json",
                      model=str(golden / "tiny-clip-vit-b16-random.pt"), device="cpu", save_cams=True)
    plan = plan_label(cfg, quiet)
    assert plan.finished is not None and plan.finished.skipped == 2 and plan.dtype.name == "float32"
    assert plan_label(replace(cfg, batch_size=1), quiet).finished is not None
    other = replace(cfg, zero_shot_threshold=0.2)
    assert plan_label(other, quiet).finished is None
    full = label_folder(other, quiet)
    assert full.skipped == 2 and full.labelled == 0


# 6. a torch / torchvision pair that does not match

def test_a_torchvision_that_does_not_match_torch_is_named_in_one_line(tmp_path, golden):
    from clipes.install_check import matching_torchvision

    assert matching_torchvision("2.14.1+cpu") == "0.29" and matching_torchvision("2.5.0") == "0.20"
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    # what a torchvision built for another torch raises on import (its _meta_registrations)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "a.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    res = subprocess.run([sys.executable, "-m", "clipes", "label", str(tmp_path / "images"), "--out",
                          str(tmp_path / "out"), "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device",
                          "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torchvision"), res.stderr
    from importlib.metadata import version

    wanted = matching_torchvision(version("torch"))
    assert "does not match torch" in lines[0] and f"pip install 'torchvision=={wanted}.*' --index-url" in lines[0]
    assert not (tmp_path / "out").exists()


def test_pytest_says_where_golden_data_was_looked_for(tmp_path):
    """A fresh clone without ../shared/golden: the header names the folder, that it is missing, and CLIPES_GOLDEN."""
    env = {**os.environ, "CLIPES_GOLDEN": str(tmp_path / "nowhere"), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_text.py")], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    header = next((line for line in res.stdout.splitlines() if line.startswith("clipes golden data:")), "")
    assert str(tmp_path / "nowhere") in header and "NOT found" in header and "CLIPES_GOLDEN=" in header, res.stdout


# 7. export: --min-area for instances, the HF masks' id-to-name map

def _coco(run: Path, out: Path, *extra) -> dict:
    res = runner.invoke(app, ["export", str(run), "-f", "coco", "-o", str(out), "--instances", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_export_min_area_drops_exactly_the_small_regions(run, tmp_path):
    pytest.importorskip("pycocotools")
    pytest.importorskip("scipy")
    from clipes.defaults import MIN_AREA

    every = _coco(run, tmp_path / "all.json", "--min-area", "0")["annotations"]
    areas = sorted(a["area"] for a in every)
    cut = areas[len(areas) // 2] if areas[0] < areas[-1] else areas[0] + 1  # a size that drops some, keeps some
    kept = _coco(run, tmp_path / "cut.json", "--min-area", str(cut))["annotations"]

    def key(a):
        return a["image_id"], a["category_id"], a["area"], tuple(a["bbox"]), a["segmentation"]["counts"]

    assert sorted(map(key, kept)) == sorted(key(a) for a in every if a["area"] >= cut)
    assert 0 < len(kept) < len(every)
    default = _coco(run, tmp_path / "default.json")["annotations"]
    assert sorted(map(key, default)) == sorted(key(a) for a in every if a["area"] >= MIN_AREA)
    # only where there are regions to drop
    for args in (["-f", "cvat", "-o", tmp_path / "c", "--min-area", "3"], ["-f", "coco", "-o", tmp_path / "x.json",
                                                                           "--min-area", "3"]):
        res = runner.invoke(app, ["export", str(run), *map(str, args)])
        assert res.exit_code == 2 and "--min-area goes with --format coco --instances" in res.output


def test_hf_masks_carry_their_id_to_name_map(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    res = runner.invoke(app, ["export", str(run), "-f", "hf", "-o", str(tmp_path / "hf"), "--images", "none"])
    assert res.exit_code == 0, res.output
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    classes = json.loads((run / "manifest.json").read_text())["settings"]["classes"]["classes"]
    names = ds.features["mask_classes"].feature.names
    assert names == ["background", *classes]  # mask value v is names[v]
    for row in ds:
        values = np.unique(np.asarray(row["mask"]))
        assert row["mask_classes"] == [int(v) for v in values if v != 255]
        # the 0-based labels name the same classes as the mask's values above 0
        assert {names[v] for v in row["mask_classes"] if v} <= {ds.features["labels"].feature.names[i]
                                                                 for i in row["labels"]}


# 4. train-seg --help: each family's preset values, read from the presets

def test_train_seg_help_gives_each_family_its_preset(tmp_path):
    import re

    from clipes.segment import SEGMENTERS
    from clipes.segment.presets import MODEL_PRESETS, PRESETS, preset_help

    assert {name: spec.preset for name, spec in SEGMENTERS.items()} == MODEL_PRESETS
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    res = subprocess.run([sys.executable, "-m", "clipes", "train-seg", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**env, "PYTHONPATH": str(REPO)})
    text = re.sub(r"[│╭╮╰╯─\s]+", " ", res.stdout)
    for key in ("optimizer", "lr", "weight_decay", "steps", "batch_size", "accumulate", "crop"):
        assert f"[preset: {preset_help(key)}]" in text, key
    # SETR's own recipe, not DeepLab's or the ViT heads': every value its preset holds
    setr = PRESETS[MODEL_PRESETS["clip-setr-pup"]]
    assert f"{setr['steps']} SETR PUP/MLA" in preset_help("steps")
    assert f"{setr['crop']} SETR PUP/MLA" in preset_help("crop")
    assert preset_help("lr").count("SETR") == 2  # naive's lr is its own


def test_miou_is_a_fraction_in_files_and_a_percentage_with_its_sign_on_screen(run, tmp_path):
    res = runner.invoke(app, ["eval", str(run), str(run / "masks"), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())["miou"] == 1.0
    assert f"mIoU 100.00% -> {tmp_path / 's.json'}" in res.output and "IoU %" in res.output


# 5. progress: each rank's bar says whose it is; a spinner names the stage while the model loads

def test_each_rank_labels_its_bar():
    from clipes.distributed import DistInfo
    from clipes.pipeline import progress_label

    assert progress_label(DistInfo()) == "labelling"
    assert progress_label(DistInfo(rank=1, world=4)) == "labelling, rank 1 of 4"


def test_model_load_and_text_encoding_show_their_stage_and_the_dtype_comes_after(run, tmp_path, golden):
    from rich.console import Console

    from clipes.label_plan import LabelConfig
    from clipes.run import label_folder

    console = Console(record=True, force_terminal=True, width=200)
    cfg = LabelConfig(images=run.parent / "photos", out=tmp_path / "out", labels=run.parent / "labels.json",
                      model=str(golden / "tiny-clip-vit-b16-random.pt"), device="cpu")
    assert label_folder(cfg, console).labelled == 2
    text = console.export_text()
    stages = [text.find(s) for s in ("loading the CLIP model on cpu", "dtype: float32", "encoding the prompts of 20")]
    assert -1 not in stages and stages == sorted(stages), text


# 6. weights that are missing are said before any dtype choice

def test_missing_weights_are_said_before_any_dtype(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "a.png")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("CLIPES_MODEL", None)
    res = subprocess.run([sys.executable, "-m", "clipes", "label", str(tmp_path / "images"), "--out",
                          str(tmp_path / "out"), "--device", "cpu", "--dtype", "auto"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: weights for ViT-B-16/openai are not cached"), res.stderr
    assert "dtype" not in res.stderr.split("error:")[0] and not (tmp_path / "out").exists()


def test_the_torch_free_method_tables_are_the_registries():
    """check_method_options answers from clipes.method_options: its names and flags are the registries' own."""
    from clipes.cams import CAMS
    from clipes.method_options import CAM_FLAGS, REFINER_FLAGS, TAGGERS, cam_spelling, refiner_spelling
    from clipes.refiners import REFINERS
    from clipes.refiners.crf_torch import CrfTorchRefiner
    from clipes.tagging import TAGGERS as TAGGER_CLASSES

    assert {n: c.flags for n, c in REFINERS.items()} == REFINER_FLAGS and CrfTorchRefiner.flags == REFINER_FLAGS["crf"]
    assert {n: c.flags for n, c in CAMS.items()} == CAM_FLAGS and tuple(TAGGER_CLASSES) == TAGGERS
    assert all(c.spelling() == refiner_spelling(n) for n, c in REFINERS.items())
    assert all(c.spelling() == cam_spelling(n) for n, c in CAMS.items())
