"""Image-level label files in every supported format, and their errors."""

from __future__ import annotations

import json

import pytest

from clipes.labels import LabelsError, read_labels
from clipes.prompts import load_class_set

VOC = load_class_set("voc")
COCO = load_class_set("coco")


def test_json_map_by_name_or_stem(tmp_path):
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"a.jpg": ["cat", "dog", "cat"], "sub/b": ["person"], "c.png": "sofa"}))
    assert read_labels(f, VOC) == {"a": [7, 11], "sub/b": [14], "c": [17]}


def test_text_lines_with_multi_word_names(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("img1 cat dog\nimg2 potted plant person # comment\n\nimg3\n")
    assert read_labels(f, VOC) == {"img1": [7, 11], "img2": [15, 14], "img3": []}
    g = tmp_path / "coco.txt"
    g.write_text("x traffic light dining table tv\n")
    assert read_labels(g, COCO) == {"x": [9, 60, 62]}


def test_voc_annotations_folder(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    obj = "<object><name>{}</name><difficult>{}</difficult></object>"
    (ann / "2007_000001.xml").write_text(
        f"<annotation><filename>2007_000001.jpg</filename>{obj.format('dog', 0)}{obj.format('person', 1)}"
        f"{obj.format('dog', 0)}</annotation>")
    (ann / "2007_000002.xml").write_text(f"<annotation>{obj.format('tvmonitor', 0)}</annotation>")
    # the order of first appearance, each class once, as the authors' label_list (generate_cams_voc12.py):
    # person (14) before dog (11) in the file stays first
    (ann / "2007_000003.xml").write_text(f"<annotation>{obj.format('person', 0)}{obj.format('dog', 0)}"
                                         f"{obj.format('person', 0)}</annotation>")
    assert read_labels(ann, VOC) == {"2007_000001": [11, 14], "2007_000002": [19], "2007_000003": [14, 11]}


def test_coco_instances_json(tmp_path):
    f = tmp_path / "instances_val2014.json"
    f.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 64, "name": "potted plant"},
                       {"id": 90, "name": "toothbrush"}],
        "annotations": [{"id": 3, "image_id": 1, "category_id": 64}, {"id": 4, "image_id": 1, "category_id": 1},
                        {"id": 5, "image_id": 1, "category_id": 64},
                        {"id": 6, "image_id": 2, "category_id": 90, "iscrowd": 1}],
    }))
    # ascending class id (not the order of the annotations); a crowd region makes no label
    assert read_labels(f, COCO) == {"COCO_val2014_000000000001": [0, 58], "b": []}


def test_user_label_files_keep_their_order(tmp_path):
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"a": ["person", "dog"]}))
    assert read_labels(f, VOC) == {"a": [14, 11]}


def test_unknown_class_names_file_and_line(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("a cat\nb catt\n")
    with pytest.raises(LabelsError, match=r"labels\.txt:2: unknown class 'catt'.*did you mean 'cat'"):
        read_labels(f, VOC)
    j = tmp_path / "labels.json"
    j.write_text(json.dumps({"a.jpg": ["giraffe"]}))
    with pytest.raises(LabelsError, match=r"labels\.json: entry 'a\.jpg': unknown class 'giraffe'"):
        read_labels(j, VOC)


@pytest.mark.parametrize(("name", "content", "match"), [
    ("broken.json", "{not json", "invalid JSON"),
    ("list.json", "[1, 2]", "expected a JSON object"),
    ("bad.xml", "<annotation>", "invalid XML"),
])
def test_malformed_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(LabelsError, match=match) as info:
        read_labels(f, VOC)
    assert name in str(info.value)


def test_missing_labels_path(tmp_path):
    with pytest.raises(LabelsError, match="no such file"):
        read_labels(tmp_path / "nope.json", VOC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelsError, match="no VOC annotation"):
        read_labels(tmp_path / "empty", VOC)
