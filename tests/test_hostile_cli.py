"""Hostile input to ``clipes label``, ``eval`` and ``view``: each case ends in one clear ``error:`` line
(exit status 2, the flag or file named, no traceback) or in a correct result, never a silent wrong one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipes.cli import app

runner = CliRunner(env={"COLUMNS": "4000"})  # wide enough that no message is folded


def _said(res) -> str:
    return " ".join(res.output.split())


def _clear_error(res, *expect: str) -> str:
    """Exit status 2 with one ``error:`` line holding every ``expect``, no traceback or usage panel."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "╭" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for e in expect:
        assert e in lines[0], res.output
    return lines[0]


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


# ---------------------------------------------------------------- label: numeric options at parse time

@pytest.mark.parametrize(("flag", "value"), [
    ("--bg-power", "-1"), ("--bg-power", "0"), ("--bg-power", "nan"), ("--bg-power", "inf"),
    ("--box-threshold", "5"), ("--box-threshold", "-0.1"), ("--box-threshold", "nan"),
    ("--zero-shot-threshold", "1.5"), ("--zero-shot-threshold", "nan"), ("--zero-shot-threshold", "-1"),
    ("--max-side", "1"), ("--max-side", "16"), ("--max-side", "-5"),
    ("--confidence", "5"), ("--confidence", "0"), ("--confidence", "nan"),
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "x"),
    ("--workers", "-1"), ("--crf-workers", "-2"),
    ("--device", "xyz"), ("--device", "cuda:x"),
])
def test_label_refuses_meaningless_numbers_at_parse_time(tmp_path, photos, flag, value):
    extra = ["--crf"] if flag == "--confidence" else []
    res = runner.invoke(app, ["label", str(photos), "--out", str(tmp_path / "out"), "--model",
                              str(tmp_path / "no-such-model.pt"), flag, value, *extra])
    _clear_error(res, flag, value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("command", [["tag"], ["prompts", "rank", "--labels", "labels.json"]])
@pytest.mark.parametrize("value", ["1", "16", "-5"])
def test_tag_and_prompts_rank_refuse_a_max_side_under_two_patches(tmp_path, photos, command, value):
    """As clipes label: one patch gives TagCLIP nothing to tag (every image skipped, exit 0) and pseudo
    masks all background."""
    res = runner.invoke(app, [*command[:1], *command[1:2], str(photos), *command[2:], "--out",
                              str(tmp_path / "o.json"), "--model", str(tmp_path / "no-such-model.pt"),
                              "--max-side", value])
    _clear_error(res, "--max-side", value)


def test_tag_with_no_image_tagged_fails_and_writes_nothing(tmp_path, golden):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(np.zeros((10, 40, 3), np.uint8)).save(folder / "thin.png")  # one patch high: under 2x2
    res = runner.invoke(app, ["tag", str(folder), "--out", str(tmp_path / "tags.json"), "--model",
                              str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu", "--workers", "0"])
    _clear_error(res, "no image", "tagged")
    assert not (tmp_path / "tags.json").exists()


def test_prompts_rank_out_under_a_file_is_refused_before_the_model_loads(tmp_path, photos):
    (tmp_path / "labels.json").write_text(json.dumps({"a": ["cat", "dog"]}))
    res = runner.invoke(app, ["prompts", "rank", str(photos), "--labels", str(tmp_path / "labels.json"),
                              "--out", str(tmp_path / "labels.json" / "r.json"), "--model",
                              str(tmp_path / "no-such-model.pt")])
    _clear_error(res, "--out", "is a file")


def test_label_accepts_the_edges_of_each_range(tmp_path):
    """Boundary values parse: the run then stops at the (missing) input folder, not at an option."""
    res = runner.invoke(app, ["label", str(tmp_path / "nope"), "--max-side", "0", "--box-threshold", "0",
                              "--zero-shot-threshold", "1", "--bg-power", "1e-3", "--workers", "0",
                              "--crf-workers", "0", "--batch-size", "auto", "--max-side", "32"])
    _clear_error(res, "does not exist")


def test_label_with_no_image_in_the_labels_file_fails(tmp_path, photos, golden):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"someone-else": ["cat"]}))
    res = runner.invoke(app, ["label", str(photos), "--out", str(tmp_path / "out"), "--labels", str(labels),
                              "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu"])
    _clear_error(res, "no image", str(labels))


# ---------------------------------------------------------------- class sets with wrong field types

@pytest.mark.parametrize(("yaml_text", "expect"), [
    ("classes: [cat]\nbox_threshold: high\n", "box_threshold"),
    ("classes: [cat]\nbox_threshold: 3\n", "box_threshold"),
    ("classes: [cat]\nbackground: 5\n", "background"),
    ("classes: [cat]\nbackground: []\n", "background"),
    ("classes: [cat]\nbackground: [sky, 7]\n", "background"),
    ("classes: [{name: cat, aliases: 5}]\n", "aliases"),
    ("classes: [{name: cat, synonyms: kitty}]\n", "synonyms"),
    ("classes: [{name: cat, prompt: [a, b]}]\n", "prompt"),
    ("classes: [cat]\ntemplates: ['{} {}']\n", "templates"),
    ("classes: [cat]\ntemplates: ['{name}']\n", "templates"),
    ("classes: [cat]\ntemplates: ['a {']\n", "templates"),
    ("classes: [cat]\ntemplates: a {}\n", "templates"),
    ("classes: [cat]\nbackgrounds: [sky]\n", "backgrounds"),
])
def test_class_set_fields_of_the_wrong_type(tmp_path, photos, yaml_text, expect):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml_text)
    res = runner.invoke(app, ["label", str(photos), "--out", str(tmp_path / "out"), "--classes", str(f),
                              "--model", str(tmp_path / "no-such-model.pt")])
    _clear_error(res, str(f), expect)


# ---------------------------------------------------------------- eval

def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def run(tmp_path) -> Path:
    """A clipes output folder with one mask (6 x 8, cat) and its CAMs, and a VOC manifest."""
    out = tmp_path / "run"
    mask = np.zeros((6, 8), np.uint8)
    mask[2:5, 3:7] = 8
    _png(out / "masks" / "a.png", mask)
    (out / "cams").mkdir()
    cam = np.zeros((1, 6, 8), np.float32)
    cam[0, 2:5, 3:7] = 1
    np.savez(out / "cams" / "a.npz", cam_refined=cam, labels=np.array([7]))
    (out / "manifest.json").write_text(json.dumps({"settings": {"classes": {"name": "voc"}}}))
    return out


@pytest.fixture()
def truth(tmp_path) -> Path:
    gt = np.zeros((6, 8), np.uint8)
    gt[2:5, 3:7] = 8
    _png(tmp_path / "gt" / "a.png", gt)
    return tmp_path / "gt"


def test_eval_scores_the_fixture(run, truth):
    res = runner.invoke(app, ["eval", str(run), str(truth)])
    assert res.exit_code == 0 and "mIoU 100.00" in _said(res), res.output


def test_eval_refuses_16_bit_ground_truth_it_cannot_read_as_classes(run, truth):
    gt = np.zeros((6, 8), np.uint16)
    gt[2:5, 3:7] = 264  # read as 8 bits this was class 8, a perfect score
    Image.fromarray(gt).save(truth / "a.png")
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth)]), str(truth / "a.png"), "264")


def test_eval_refuses_ground_truth_above_the_class_count(run, truth):
    gt = np.zeros((6, 8), np.uint8)
    gt[0, 0] = 30
    _png(truth / "a.png", gt)
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth)]), str(truth / "a.png"), "30", "21")


def test_eval_names_the_image_whose_sizes_differ(run, truth):
    _png(truth / "a.png", np.zeros((8, 6), np.uint8))  # the same size turned: an EXIF-rotated photo
    msg = _clear_error(runner.invoke(app, ["eval", str(run), str(truth)]), "a.png", "8x6", "6x8", "--ignore-exif")
    _png(truth / "a.png", np.zeros((10, 10), np.uint8))
    msg = _clear_error(runner.invoke(app, ["eval", str(run), str(truth)]), "a.png", "8x6", "10x10")
    assert "--ignore-exif" not in msg


def test_eval_with_a_truncated_manifest(run, truth):
    (run / "manifest.json").write_text('{"settings": {"cla')
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth)]), str(run / "manifest.json"))


@pytest.mark.parametrize(("content", "expect"), [
    ('{"images": [{"id": 1, "file_na', "not valid JSON"),
    ('{"images": [], "annotations": []}', "categories"),
    ('[1, 2]', "object"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}', "height"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 6, "width": 8}], "categories": [{"id": 1, '
     '"name": "cat"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}', "segmentation"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 6, "width": 8}], "categories": [{"id": 1, '
     '"name": "cat"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": []}]}',
     "category_id 9"),
])
def test_eval_with_a_broken_coco_json(tmp_path, run, content, expect):
    f = tmp_path / "instances.json"
    f.write_text(content)
    _clear_error(runner.invoke(app, ["eval", str(run), str(f), "--classes", "coco"]), str(f), expect)


def test_eval_writes_json_and_plot_into_new_folders(tmp_path, run, truth):
    target = tmp_path / "new" / "deeper"
    res = runner.invoke(app, ["eval", str(run), str(truth), "--json", str(target / "s.json"),
                              "--plot", str(target / "p" / "iou.png")])
    assert res.exit_code == 0, res.output
    assert json.loads((target / "s.json").read_text())["miou"] == 1.0
    assert Image.open(target / "p" / "iou.png").format == "PNG"


def test_eval_json_under_a_file_is_a_clear_error(tmp_path, run, truth):
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["eval", str(run), str(truth), "--json", str(tmp_path / "afile" / "s.json")])
    _clear_error(res, "--json", str(tmp_path / "afile" / "s.json"))


@pytest.mark.parametrize("value", ["1,x", "1,nan", "0", "-1", "1,,2", "1,inf"])
def test_eval_search_bg_power_values(run, truth, value):
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth), "--search-bg-power", value]),
                 "--search-bg-power", value)


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_eval_with_a_corrupt_npz(run, truth, content):
    (run / "cams" / "a.npz").write_bytes(content)
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth), "--search-bg-power", "1,2"]),
                 str(run / "cams" / "a.npz"))


def test_eval_with_an_npz_missing_its_arrays(run, truth):
    np.savez(run / "cams" / "a.npz", cam=np.zeros((1, 2, 2), np.float32))
    _clear_error(runner.invoke(app, ["eval", str(run), str(truth), "--search-bg-power", "1"]),
                 str(run / "cams" / "a.npz"), "cam_refined")


def test_eval_uses_the_runs_own_class_set(tmp_path, truth):
    """A run made with a 3-class set is scored over 4 classes, not VOC's 21."""
    out = tmp_path / "mine"
    _png(out / "masks" / "a.png", np.zeros((6, 8), np.uint8))
    classes = {"name": "pets", "classes": ["cat", "dog", "bird"], "prompts": ["cat", "dog", "bird"],
               "background": ["sky"], "templates": ["a {}."], "box_threshold": 0.4}
    (out / "manifest.json").write_text(json.dumps({"settings": {"classes": classes}}))
    gt = np.zeros((6, 8), np.uint8)
    gt[0, 0] = 2
    _png(truth / "a.png", gt)
    res = runner.invoke(app, ["eval", str(out), str(truth), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert list(json.loads((tmp_path / "s.json").read_text())["classes"]) == ["background", "cat", "dog", "bird"]


# ---------------------------------------------------------------- view

def _view_run(tmp_path: Path, records: dict[str, str]) -> Path:
    """A run whose photos are ``photos/<file>`` and masks ``masks/<stem>.png``, one colour per image."""
    photos, out = tmp_path / "photos", tmp_path / "run"
    for i, (stem, file) in enumerate(records.items()):
        _png(photos / file, np.full((6, 8, 3), 40 * i, np.uint8))
        _png(out / "masks" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    (out / "manifest.json").write_text(json.dumps({"input": str(photos), "settings": {"classes": {
        "name": "voc", "classes": ["aeroplane"]}}}))
    (out / "labels.json").write_text(json.dumps({s: {"labels": [], "file": f, "source": "given"}
                                                 for s, f in records.items()}))
    return out


def _photo_sources(page: Path) -> list[str]:
    return re.findall(r'<td[^>]*><img src="([^"]+)" alt="photo"', page.read_text())


def test_view_thumbnails_of_a_slash_b_and_a__b_differ(tmp_path):
    out = _view_run(tmp_path, {"a/b": "a/b.png", "a__b": "a__b.png"})
    res = runner.invoke(app, ["view", str(out)])
    assert res.exit_code == 0, res.output
    sources = _photo_sources(out / "view" / "index.html")
    assert len(sources) == 2 and len(set(sources)) == 2
    pixels = {np.asarray(Image.open(out / "view" / s))[0, 0, 0] for s in sources}
    assert len(pixels) == 2  # each row shows its own photo


def test_view_shows_images_whose_photo_is_elsewhere(tmp_path):
    """Two folders labelled into one --out: the manifest names the last; the other's rows still show."""
    out = _view_run(tmp_path, {"x": "x.png", "y": "y.png"})
    (tmp_path / "photos" / "y.png").unlink()
    res = runner.invoke(app, ["view", str(out)])
    assert res.exit_code == 0, res.output
    page = (out / "view" / "index.html").read_text()
    assert page.count("<tr><td>") == 2 and "photo not found" in page


def test_view_limit_zero_is_refused(tmp_path):
    out = _view_run(tmp_path, {"x": "x.png"})
    _clear_error(runner.invoke(app, ["view", str(out), "--limit", "0"]), "--limit")


@pytest.mark.parametrize("name", ["labels.json", "manifest.json"])
def test_view_with_a_truncated_json(tmp_path, name):
    out = _view_run(tmp_path, {"x": "x.png"})
    (out / name).write_text('{"x": {"lab')
    _clear_error(runner.invoke(app, ["view", str(out)]), str(out / name))


def test_view_with_ground_truth_of_another_size(tmp_path):
    out = _view_run(tmp_path, {"x": "x.png"})
    _png(tmp_path / "gt" / "x.png", np.zeros((5, 5), np.uint8))
    _clear_error(runner.invoke(app, ["view", str(out), "--gt", str(tmp_path / "gt")]), "x", "8x6", "5x5")


# ---------------------------------------------------------------- help texts render every word

@pytest.mark.parametrize("command", ["label", "eval", "view"])
def test_help_texts_render_in_full(command):
    import typer.main

    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.replace("│", " ").split())
    cmd = typer.main.get_command(app).commands[command]
    texts = [p.help for p in cmd.params if getattr(p, "help", None)] + [cmd.help]
    assert len(texts) > 3
    for text in texts:
        assert " ".join(text.replace("\\[", "[").split()) in said, text
