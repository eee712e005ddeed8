"""``clipes prompts``: the sharpness metric, the template ranking, its outputs, and bad inputs."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clipes.prompt_selection as ps
import clipes.run as run
from clipes import Labeler, load_class_set
from clipes.cli import app
from clipes.evaluate import confusion, read_label_png, scores
from clipes.images import preprocess, read_image
from clipes.text import encode_class_set

from .conftest import TINY_CKPT
from .tolerances import MIOU_ORDER_ATOL

runner = CliRunner()
FEW = ["a photo of a {}.", "a bad photo of the {}.", "itap of my {}.", "a sketch of a {}."]


@pytest.fixture()
def fast_model(monkeypatch, tiny_clip):
    """The session's tiny model instead of loading the checkpoint again in every command."""
    def load(spec, device, dtype=None):  # float32: tests/conftest.py pins CLIPES_DTYPE, as the session's model is
        assert dtype in (None, torch.float32)
        return tiny_clip

    monkeypatch.setattr("clipes.model.load_clip", load)  # the command imports it late
    monkeypatch.setattr(run, "load_clip", load)
    return tiny_clip


@pytest.fixture(scope="module")
def small(tmp_path_factory, golden) -> Path:
    """Small copies of four golden images (two with two labels), their ground truth and labels."""
    root = tmp_path_factory.mktemp("small")
    (root / "images").mkdir()
    (root / "gt").mkdir()
    for stem in ("2009_000573", "2007_000033", "coffee", "chelsea"):
        Image.open(golden / "images" / f"{stem}.png").resize((96, 80)).save(root / "images" / f"{stem}.png")
        if (golden / "gt" / f"{stem}.png").is_file():
            Image.open(golden / "gt" / f"{stem}.png").resize((96, 80), Image.NEAREST).save(root / "gt" / f"{stem}.png")
    shutil.copy(golden / "labels.json", root / "labels.json")
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _rank(data: Path, *extra: str, images: Path | None = None, labels: Path | None = None):
    """``clipes prompts rank`` on ``data``/images with ``data``/labels.json (the golden folder or ``small``)."""
    args = ["prompts", "rank", str(images or data / "images"), "--labels", str(labels or data / "labels.json"),
            "--model", str(TINY_CKPT), "--device", "cpu", "--workers", "0", *extra]
    return runner.invoke(app, args)


# --- the metric -----------------------------------------------------------------------------------------------

def test_sharpness_by_hand_spread_beats_peaked():
    """Two templates on three images of three classes: one spreads the mass over the labelled classes,
    the other gives it to one of them. The spread one is less sharp and ranks first."""
    labels = ps.label_matrix([[0, 1], [0, 1, 2], [2]], 3)
    spread = torch.tensor([[0.45, 0.45, 0.10], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    peaked = torch.tensor([[0.85, 0.05, 0.10], [0.98, 0.01, 0.01], [0.0, 0.0, 1.0]], dtype=torch.float64)
    probs = torch.stack([peaked, spread])  # (templates, images, classes)

    def by_numpy(p: torch.Tensor, rows) -> float:  # population variance over mean, averaged over the images
        return float(np.mean([np.var(p[i, r].numpy()) / np.mean(p[i, r].numpy()) for i, r in rows]))

    rows = [(0, [0, 1]), (1, [0, 1, 2])]  # the single-label image does not count
    got = ps.sharpness(probs, labels)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(by_numpy(peaked, rows), rel=1e-12)
    assert got[1].item() == pytest.approx(0.0, abs=1e-15)
    assert got[0].item() == pytest.approx((0.4**2 / 0.45 + np.var([0.98, 0.01, 0.01]) / (1 / 3)) / 2, rel=1e-12)
    per_image = ps.image_sharpness(peaked, labels)
    assert torch.isnan(per_image[2]) and not torch.isnan(per_image[:2]).any()

    ranked = ps.rank([ps.TemplateScore("peaked {}.", float(got[0]), 2),
                      ps.TemplateScore("spread {}.", float(got[1]), 2)])
    assert [r.template for r in ranked] == ["spread {}.", "peaked {}."]


def test_sharpness_needs_multi_label_images():
    with pytest.raises(ValueError, match="two or more labels"):
        ps.sharpness(torch.full((2, 3), 1 / 3), ps.label_matrix([[0], []], 3))


def test_rank_is_stable_for_ties():
    tied = [ps.TemplateScore(t, 0.5, 3) for t in ("b {}.", "a {}.", "c {}.")]
    assert [r.template for r in ps.rank(tied)] == ["b {}.", "a {}.", "c {}."]


def test_image_embedding_is_the_zero_shot_one(labeler, golden):
    """The embedding ranked here is the one the Labeler's zero-shot path scores: the same best scores (the
    labels' and the five best others', as labels.json records them)."""
    image = read_image(golden / "images" / "chelsea.png").resize((96, 64))
    expected = labeler.label(image, None).scores
    prepared = labeler.prepare(image)
    emb = ps.image_embeddings(labeler.clip, prepared.tensor[None])
    text = torch.cat([labeler.text.fg, labeler.text.bg])
    probs = ps.class_probs(emb, text, labeler.logit_scale)[0, : len(labeler.class_set)]
    assert len(expected) >= 6  # one label at least, and five other classes
    top = probs.topk(len(expected))
    got = {labeler.class_set.classes[int(i)]: float(v) for v, i in zip(*top, strict=True)}
    assert list(got) == list(expected)
    assert np.allclose(list(got.values()), list(expected.values()), atol=2e-6)


# --- templates ------------------------------------------------------------------------------------------------

def test_imagenet_templates_are_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    ours = ps.imagenet_templates()
    assert ours == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] and len(set(ours)) == 80
    cands = ps.candidate_templates(load_class_set("voc"), ["a photo of a {}.", "my own {}."])
    assert len(cands) == 82 and cands[80:] == ["a clean origami {}.", "my own {}."]
    assert ps.candidate_templates(load_class_set("voc"), ["x {}."], imagenet=False) == ["a clean origami {}.", "x {}."]


@pytest.mark.parametrize(("text", "match"), [
    ("", "no templates"),
    ("# only a comment\n\n", "no templates"),
    ("a photo of a cat.\n", "exactly one"),
    ("a {} and a {}.\n", "exactly one"),
    ("a {0} photo.\n", "exactly one"),
    ("a {} in {braces}.\n", "no other field"),
])
def test_bad_template_files(tmp_path, text, match):
    with pytest.raises(ps.TemplateError, match=match):
        ps.read_templates(_write(tmp_path / "t.txt", text))


def test_template_file_literal_braces_and_comments(tmp_path):
    got = ps.read_templates(_write(tmp_path / "t.txt", "# mine\n\n  a {{curly}} {}.  \nitap of my {}.\n"))
    assert got == ["a {{curly}} {}.", "itap of my {}."] and got[0].format("cat") == "a {curly} cat."


# --- the command ----------------------------------------------------------------------------------------------

def test_rank_end_to_end_on_golden(tmp_path, golden):
    """Real checkpoint loading, the golden images, every candidate: table, JSON and a usable class set."""
    out, yaml_out = tmp_path / "ranking.json", tmp_path / "best.yaml"
    res = _rank(golden, "--out", str(out), "--write-class-set", str(yaml_out), "--show", "5")
    assert res.exit_code == 0, res.output
    ranking = json.loads(out.read_text())
    assert len(ranking) == 81 and all(set(r) == {"template", "sharpness", "images"} for r in ranking)
    assert [r["sharpness"] for r in ranking] == sorted(r["sharpness"] for r in ranking)
    assert {r["images"] for r in ranking} == {2}  # 2009_000573 and coffee have two labels
    assert "a clean origami {}." in {r["template"] for r in ranking}
    assert "(class set's)" in res.output and "ms a template" in res.output
    loaded = load_class_set(yaml_out)
    voc = load_class_set("voc")
    assert loaded.templates == (ranking[0]["template"],)
    assert loaded == replace(voc, templates=loaded.templates) and loaded.aliases == voc.aliases


def test_ranking_is_deterministic_and_matches_the_metric(tmp_path, small, fast_model):
    templates = _write(tmp_path / "t.txt", "\n".join(FEW) + "\n")
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(out))
        assert res.exit_code == 0, res.output
    assert outs[0].read_bytes() == outs[1].read_bytes()
    ranking = json.loads(outs[0].read_text())
    assert sorted(r["template"] for r in ranking) == sorted([*FEW, "a clean origami {}."])

    # the same numbers from the pieces: embeddings of the two multi-label images, one text batch a template
    voc = load_class_set("voc")
    labels = {"2009_000573": ["bicycle", "bottle"], "coffee": ["diningtable", "bottle"]}
    emb = torch.cat([ps.image_embeddings(fast_model, preprocess(read_image(small / "images" / f"{s}.png"),
                                                                fast_model.patch_size, 1024)[None])
                     for s in labels])
    lab = ps.label_matrix([[voc.index(n) for n in names] for names in labels.values()], len(voc))
    for r in ranking:
        expected = ps.score_templates(fast_model, voc, emb, lab, [r["template"]])[0].sharpness
        assert r["sharpness"] == pytest.approx(expected, rel=1e-5)


def test_controlled_text_features_rank_spread_first(tmp_path, small, fast_model, monkeypatch):
    """Through the whole command, with the image embedding and text features fixed by hand: a template
    whose classes all match the image equally beats one whose 'bottle' takes the mass."""
    e = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    o = torch.tensor([0.0, 1.0, 0.0, 0.0])

    def text(clip, names, templates):
        cos = {"spread {}.": [0.3] * len(names),
               "peaked {}.": [1.0 if n == "bottle" else 0.0 for n in names]}.get(
            templates[0], [0.5 if n == "bottle" else 0.4 for n in names])
        return torch.stack([c * e[0] + (1 - c * c) ** 0.5 * o for c in cos])

    monkeypatch.setattr(ps, "image_embeddings", lambda clip, images: e.expand(len(images), -1))
    monkeypatch.setattr(ps, "encode_prompts", text)
    templates = _write(tmp_path / "t.txt", "peaked {}.\nspread {}.\n")
    out, yaml_out = tmp_path / "r.json", tmp_path / "best.yml"
    res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(out),
                "--write-class-set", str(yaml_out))
    assert res.exit_code == 0, res.output
    ranking = json.loads(out.read_text())
    assert [r["template"] for r in ranking] == ["spread {}.", "a clean origami {}.", "peaked {}."]

    scale = float(fast_model.model.logit_scale.exp())
    voc = load_class_set("voc")

    def expected(template: str) -> float:
        """By hand from the same (float32) features; both multi-label images hold bottle and one other class."""
        cos = (text(None, voc.prompts, (template,)) @ e[0]).double().numpy()
        p = np.exp(scale * cos) / np.exp(scale * cos).sum()
        pairs = [p[[voc.index("bottle"), voc.index(other)]] for other in ("bicycle", "diningtable")]
        return float(np.mean([np.var(s) / np.mean(s) for s in pairs]))

    assert ranking[0]["sharpness"] == 0.0
    # rel=1e-12 holds on any CPU: e has one non-zero entry, so every cosine is one exact product, whatever the
    # summation order; the rest is float64
    assert ranking[1]["sharpness"] == pytest.approx(expected("a clean origami {}."), rel=1e-12)
    assert ranking[2]["sharpness"] == pytest.approx(expected("peaked {}."), rel=1e-12)
    assert ranking[2]["sharpness"] > 0.49  # 0.5 is the most two labels can give: one class takes everything
    assert load_class_set(yaml_out).templates == ("spread {}.",)


def test_written_class_set_labels(tmp_path, small, fast_model):
    """``clipes label --classes OUT.yaml`` runs with the winning template."""
    templates = _write(tmp_path / "t.txt", "a photo of a {}.\n")
    yaml_out = tmp_path / "best.yaml"
    res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(tmp_path / "r.json"),
                "--write-class-set", str(yaml_out))
    assert res.exit_code == 0, res.output
    winner = json.loads((tmp_path / "r.json").read_text())[0]["template"]
    images = tmp_path / "images"
    images.mkdir()
    Image.open(small / "images" / "coffee.png").resize((64, 48)).save(images / "coffee.png")
    labels = _write(tmp_path / "labels.json", json.dumps({"coffee": ["diningtable", "bottle"]}))
    res = runner.invoke(app, ["label", str(images), "--out", str(tmp_path / "run"), "--classes", str(yaml_out),
                              "--labels", str(labels), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["settings"]["classes"]["templates"] == [winner]


def test_validate_reports_pseudo_mask_miou(tmp_path, small, fast_model):
    """--gt/--validate: the top templates' mIoU equals labelling the same images with that template."""
    images, gt = small / "images", small / "gt"  # coffee and chelsea have no ground truth
    templates = _write(tmp_path / "t.txt", "\n".join(FEW) + "\n")
    out = tmp_path / "r.json"
    res = _rank(small, "--templates", str(templates), "--no-imagenet", "--out", str(out), "--gt", str(gt),
                "--validate", "2")
    assert res.exit_code == 0, res.output
    ranking = json.loads(out.read_text())
    assert [("miou" in r) for r in ranking] == [True, True] + [False] * (len(ranking) - 2)
    assert {r["images"] for r in ranking} == {2} and ranking[0]["miou_images"] == 2
    assert "mIoU" in res.output

    labels = json.loads((small / "labels.json").read_text())
    voc = load_class_set("voc")
    for r in ranking[:2]:
        labeler = Labeler(fast_model, ps.with_template(voc, r["template"]), max_side=1024)
        hist = sum(confusion(labeler.label(read_image(images / f"{s}.png"), labels[f"{s}.png"]).mask,
                             read_label_png(gt / f"{s}.png"), len(voc) + 1) for s in ("2009_000573", "2007_000033"))
        # the command labels the images as a batch, this loop one at a time (tests/tolerances.py)
        assert r["miou"] == pytest.approx(scores(hist).miou, abs=MIOU_ORDER_ATOL)


@pytest.mark.parametrize(("labels", "extra", "match"), [
    ({"chelsea.png": ["cat"], "coffee.png": ["bottle"]}, [], "sharpness needs images with two or more labels"),
    ({"coffee.png": ["bottle", "horsee"]}, [], "unknown class 'horsee'.*did you mean 'horse'"),
    ({"coffee.png": ["bottle", "cat"]}, ["--templates", "EMPTY"], "no templates"),
    ({"coffee.png": ["bottle", "cat"]}, ["--templates", "NOBRACE"], "needs exactly one"),
    ({"coffee.png": ["bottle", "cat"]}, ["--templates", "MISSING"], "no such file"),
    ({"coffee.png": ["bottle", "cat"]}, ["--write-class-set", "best.txt"], "must end in .yaml or .yml"),
    ({"coffee.png": ["bottle", "cat"]}, ["--out", "IN_INPUT"], "inside the input folder"),
    ({"coffee.png": ["bottle", "cat"]}, ["--validate", "2"], "--validate needs ground truth"),
    ({"coffee.png": ["bottle", "cat"]}, ["--classes", "nonesuch"], "neither a built-in class set"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, small, fast_model, labels, extra, match):
    files = {"EMPTY": _write(tmp_path / "empty.txt", "\n"), "NOBRACE": _write(tmp_path / "nb.txt", "a cat.\n"),
             "MISSING": tmp_path / "missing.txt", "IN_INPUT": small / "images" / "r.json"}
    extra = [str(files.get(a, a)) for a in extra]
    res = _rank(small, "--out", str(tmp_path / "r.json"), *extra,
                labels=_write(tmp_path / "labels.json", json.dumps(labels)))
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert re.search(match, " ".join(res.output.split())), res.output
    assert not (tmp_path / "r.json").exists()


def test_rank_without_labels_asks_for_them(small, tmp_path):
    res = runner.invoke(app, ["prompts", "rank", str(small / "images"), "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "--labels" in res.output


def test_rank_on_a_voc_layout(tmp_path, golden, fast_model):
    """--dataset voc --root: images, labels (Annotations/) and the split file of a VOC tree."""
    voc_root = tmp_path / "data" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (voc_root / d).mkdir(parents=True)
    objects = {"2009_000573": ["bicycle", "bottle"], "2007_000033": ["aeroplane"]}
    for stem, names in objects.items():
        Image.open(golden / "images" / f"{stem}.png").convert("RGB").resize((80, 64)).save(
            voc_root / "JPEGImages" / f"{stem}.jpg")
        xml = "".join(f"<object><name>{n}</name></object>" for n in names)
        (voc_root / "Annotations" / f"{stem}.xml").write_text(f"<annotation>{xml}</annotation>")
    (voc_root / "ImageSets/Segmentation/train.txt").write_text("\n".join(objects) + "\n")
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["prompts", "rank", "--dataset", "voc", "--root", str(tmp_path / "data"), "--no-imagenet",
                              "--device", "cpu", "--workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())[0]["images"] == 1


# --- prompts show ---------------------------------------------------------------------------------------------

def test_show_prints_what_is_encoded(tmp_path, tiny_clip):
    classes = _write(tmp_path / "mine.yaml",
                     "classes:\n  - {name: robot, prompt: 'shiny robot,droid'}\n  - crate\n"
                     "background: [floor, wall]\ntemplates: ['a photo of a {}.', 'art of the {}.']\n")
    res = runner.invoke(app, ["prompts", "show", "--classes", str(classes)])
    assert res.exit_code == 0, res.output
    rows = [line.split("\t") for line in res.stdout.splitlines() if not line.startswith("#")]

    seen: list[str] = []

    def spy(texts):
        seen.extend(texts)
        return tiny_clip.tokenizer(texts)

    encode_class_set(replace(tiny_clip, tokenizer=spy), load_class_set(classes))
    assert [p for _, p in rows] == seen
    assert rows[:2] == [["robot", "a photo of a shiny robot,droid."], ["robot", "art of the shiny robot,droid."]]
    assert [n for n, _ in rows] == ["robot"] * 2 + ["crate"] * 2 + ["background"] * 4

    other = _write(tmp_path / "t.txt", "itap of my {}.\n")
    res = runner.invoke(app, ["prompts", "show", "--classes", "voc", "--templates", str(other)])
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and "bird\titap of my bird avian." in lines and "background\titap of my sky." in lines
    assert len(lines) == 1 + 20 + 25


def test_show_bad_class_file(tmp_path):
    res = runner.invoke(app, ["prompts", "show", "--classes", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("command", ["rank", "show"])
def test_help_texts_render_in_full(command):
    """Rich markup must not eat any of the help (a bracket taken for a tag vanishes)."""
    import typer.main

    res = runner.invoke(app, ["prompts", command, "--help"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.replace("│", " ").split())
    cmd = typer.main.get_command(app).commands["prompts"].commands[command]
    texts = [p.help for p in cmd.params if getattr(p, "help", None)] + [cmd.help]
    assert len(texts) > 2
    for text in texts:
        assert " ".join(text.replace("\\[", "[").split()) in said, text
