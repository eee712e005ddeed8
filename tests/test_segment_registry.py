"""segment/ as encoders + heads + a registry: every ``train-seg --model`` name builds the network it built
before the split (same state-dict keys, order and shapes), and a checkpoint written by that clipes loads and
predicts as it did. Fixtures: tests/data/segmenter-*-main-9d7e1e3.*, made by tests/data/make_segmenter_fixture.py
with the clipes of main at 9d7e1e3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipes.segment import SEGMENTERS, build_segmenter
from clipes.segment.infer import load_segmenter

DATA = Path(__file__).parent / "data"
BEFORE = json.loads((DATA / "segmenter-keys-main-9d7e1e3.json").read_text())


def test_every_name_is_kept():
    assert list(SEGMENTERS) == list(BEFORE["models"])


@pytest.mark.parametrize("name", list(BEFORE["models"]))
def test_same_state_dict_layout(name):
    kw = {"clip_vision": BEFORE["vision"]} if name.startswith("clip-") else {"backbone_weights": "random"}
    model = build_segmenter(name, BEFORE["classes"], **kw)
    now = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert now == list(BEFORE["models"][name].items())


def test_old_checkpoint_loads_and_predicts_the_same():
    model, cfg, classes = load_segmenter(DATA / "segmenter-main-9d7e1e3.pt", torch.device("cpu"))
    assert (cfg.model, classes) == ("clip-linear", ["cat", "dog"])
    ref = torch.load(DATA / "segmenter-main-9d7e1e3-logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(ref["input"])
    # same code, same weights; only the summation order of matmuls may differ across CPUs (fp32 rounding)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
