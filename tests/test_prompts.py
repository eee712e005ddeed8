"""Class sets: the reference's prompts and background lists, user files, and clear errors."""

from __future__ import annotations

import pytest

from clipes.prompts import ClassSetError, builtin_class_sets, class_set_from_dict, load_class_set


def test_builtin_sets():
    assert {"voc", "coco"} <= set(builtin_class_sets())


def test_voc_matches_the_reference():
    voc = load_class_set("voc")
    assert len(voc) == 20 and len(voc.background) == 25 and voc.box_threshold == 0.4
    assert voc.templates == ("a clean origami {}.",)
    fused = {c: p for c, p in zip(voc.classes, voc.prompts, strict=False) if c != p}
    assert fused == {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
                     "tvmonitor": "tvmonitor screen"}
    assert voc.background[-2:] == ("bridge", "sign") and "keyboard" in voc.background


def test_coco_matches_the_reference():
    coco = load_class_set("coco")
    assert len(coco) == 80 and len(coco.background) == 23 and coco.box_threshold == 0.7
    assert not {"keyboard", "sign"} & set(coco.background)
    prompt = dict(zip(coco.classes, coco.prompts, strict=False))
    assert prompt["snowboard"] == "sknowboard" and prompt["tv"] == "tvmonitor screen"
    assert prompt["hair drier"] == "hairdrier,blowdrier" and prompt["baseball glove"] == "glove"
    assert prompt["spoon"] == "dessertspoon" and prompt["tie"] == "necktie"
    assert coco.index("motorbike") == coco.index("motorcycle") == 3


def test_names_and_aliases_are_found_loosely():
    voc = load_class_set("voc")
    assert voc.index("Potted_Plant") == voc.index("pottedplant") == 15
    with pytest.raises(ClassSetError, match="did you mean 'horse'"):
        voc.index("horsee")


def test_plain_text_user_set(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\nrobot: droid, android\n\ncrate\n")
    cs = load_class_set(f)
    assert cs.classes == ("robot", "crate")
    assert cs.prompts == ("robot,droid,android", "crate")
    assert cs.index("droid") == 0 and len(cs.background) == 23


def test_a_user_set_as_a_run_records_it(tmp_path):
    """A run's manifest keeps a user file's set with name null: it reads back (eval, view, export use it)."""
    (tmp_path / "mine.txt").write_text("disc: circle\nsquare\n")
    recorded = {**load_class_set(tmp_path / "mine.txt").to_dict(), "name": None}
    cs = class_set_from_dict(recorded)
    assert cs.classes == ("disc", "square") and cs.prompts == ("disc,circle", "square")


def test_yaml_user_set(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("classes:\n  - {name: robot, prompt: shiny robot}\n  - crate\nbackground: [floor, wall]\n"
                 "templates: ['a photo of a {}.', 'a {}.']\nbox_threshold: 0.5\n")
    cs = load_class_set(f)
    assert cs.prompts == ("shiny robot", "crate") and cs.background == ("floor", "wall")
    assert len(cs.templates) == 2 and cs.box_threshold == 0.5 and cs.name == "mine"


@pytest.mark.parametrize(("text", "match"), [
    ("cat\ndog\nCat\n", "lists 'Cat' twice"),
    ("", "has no classes"),
])
def test_bad_user_sets(tmp_path, text, match):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(ClassSetError, match=match) as info:
        load_class_set(f)
    assert str(f) in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("classes: [a, b\n")
    with pytest.raises(ClassSetError, match="invalid YAML"):
        load_class_set(f)
    f.write_text("classes: [a]\ntemplates: ['no placeholder']\n")
    with pytest.raises(ClassSetError, match="placeholder"):
        load_class_set(f)
    with pytest.raises(ClassSetError, match="neither a built-in class set"):
        load_class_set(tmp_path / "nope.txt")
