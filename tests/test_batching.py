"""Batched labelling: size buckets, DataLoader samples, OOM back-off, and multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipes.batching import HalvingBatches
from clipes.data import ImageFolderDataset, probe_input_size, size_batches
from clipes.pipeline import decode_workers

from .test_cli import _label, _labels_file, _tree_digest, images  # noqa: F401 - fixture reused


def test_size_batches_groups_equal_sizes_in_order():
    sizes = [(32, 32), (16, 48), (32, 32), (32, 32), (16, 48), (32, 32)]
    assert size_batches(sizes, 2) == [[0, 2], [3, 5], [1, 4]]
    assert sorted(i for b in size_batches(sizes, 10) for i in b) == list(range(6))


def test_probe_input_size_reads_headers_and_exif(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "a.png")
    assert probe_input_size(tmp_path / "a.png", 16, None) == (32, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert probe_input_size(tmp_path / "r.jpg", 16, None) == (48, 32)
    assert probe_input_size(tmp_path / "r.jpg", 16, None, exif_transpose=False) == (32, 48)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert probe_input_size(tmp_path / "bad.jpg", 16, None) == (0, 0)


def test_dataset_turns_unreadable_files_into_errors(tmp_path):
    Image.new("RGB", (20, 30), "blue").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    ds = ImageFolderDataset([("ok", tmp_path / "ok.png", [1]), ("bad", tmp_path / "bad.png", None)], 16, None,
                            keep_image=True)
    ok, bad = ds[0], ds[1]
    assert ok.error is None and ok.prepared.tensor.shape == (3, 32, 32) and ok.prepared.size == (30, 20)
    assert ok.prepared.labels == [1] and ok.prepared.rgb.shape == (30, 20, 3)
    assert bad.prepared is None and "bad.png" in bad.error


class _FakeLabeler:
    """Runs out of memory on batches larger than ``fits``; records the batch sizes it ran."""

    def __init__(self, fits: int) -> None:
        self.fits, self.calls = fits, []

    def label_prepared(self, chunk, skip_unusable: bool = False):
        if len(chunk) > self.fits:
            raise torch.OutOfMemoryError("fake")
        self.calls.append(len(chunk))
        return [f"result-{int(p.tensor[0, 0, 0])}" for p in chunk]


def _prepared(n: int):
    from clipes.labeler import PreparedImage

    return [PreparedImage(torch.full((3, 16, 16), float(i)), (16, 16), [0]) for i in range(n)]


def test_batch_sizer_halves_on_out_of_memory_and_keeps_order():
    fake = _FakeLabeler(fits=3)
    sizer = HalvingBatches(fake.label_prepared, 8, lambda p: tuple(p.tensor.shape[-2:]))
    assert sizer(_prepared(7)) == [f"result-{i}" for i in range(7)]
    assert sizer.batch_size == 3 and fake.calls == [3, 3, 1]  # 7 -> OOM -> halves of 3
    zero = HalvingBatches(_FakeLabeler(fits=0).label_prepared, 2, lambda p: tuple(p.tensor.shape[-2:]))
    out = zero(_prepared(2))
    assert all("out of memory at input size 16x16" in o for o in out)


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in sorted((out / "masks").rglob("*.png"))}


def test_batch_size_and_workers_do_not_change_the_masks(tmp_path, images, golden):  # noqa: F811
    model = golden / "tiny-clip-vit-b16-random.pt"
    labels = str(_labels_file(tmp_path))
    one, many = tmp_path / "one", tmp_path / "many"
    assert _label(images, one, "--labels", labels, "--batch-size", "1", "--workers", "0", model=model).exit_code == 0
    res = _label(images, many, "--labels", labels, "--batch-size", "3", "--workers", "2", model=model)
    assert res.exit_code == 0, res.output
    a, b = _masks(one), _masks(many)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert (a[k] == b[k]).mean() >= 0.999, k
    assert json.loads((one / "labels.json").read_text()) == json.loads((many / "labels.json").read_text())


def test_bad_batch_size_is_refused(tmp_path, images, golden):  # noqa: F811
    res = _label(images, tmp_path / "o", "--batch-size", "0", model=golden / "tiny-clip-vit-b16-random.pt")
    assert res.exit_code == 2 and "--batch-size" in res.output


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_two_processes_write_what_one_process_writes(tmp_path, images, golden):  # noqa: F811
    model = str(golden / "tiny-clip-vit-b16-random.pt")
    labels = str(_labels_file(tmp_path))
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["label", str(images), "--labels", labels, "--model", model, "--device", "cpu", "--workers", "0",
              "--save-cams"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "clipes", *common, "--out", str(single)], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", "-m", "clipes", *common, "--out", str(multi)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "labelled 4 image(s)" in run.stderr
    a, b = _masks(single), _masks(multi)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert (a[k] == b[k]).mean() >= 0.999, k
    assert json.loads((single / "labels.json").read_text()) == json.loads((multi / "labels.json").read_text())
    assert sorted(_tree_digest(single / "cams")) == sorted(_tree_digest(multi / "cams"))
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["summary"]["labelled"] == 4
    assert not list(multi.glob(".clipes/records.rank*.jsonl"))  # merged into one journal at the end


def test_decode_workers_default_scales_with_the_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert decode_workers(3, torch.device("cuda")) == 3  # as asked, on any device
    assert decode_workers(None, torch.device("cpu")) == 1  # the engine needs the cores
    assert decode_workers(None, torch.device("cuda")) == 8
    assert decode_workers(None, torch.device("cuda"), world=4) == 3  # 16 cores shared by 4 GPU processes
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers(None, torch.device("cuda"), world=2) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_more_processes_than_images_to_do(tmp_path, golden):
    """A rank with nothing to do still joins the job's collectives (it used to leave early and crash the others)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(golden / "images" / "chelsea.png").resize((64, 48)).save(folder / "a.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a": ["cat"]}))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "clipes", "label", str(folder), "--labels", str(labels),
                          "--model", str(golden / "tiny-clip-vit-b16-random.pt"), "--device", "cpu",
                          "--workers", "0", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "labelled 1 image(s)" in run.stderr
    assert (out / "masks" / "a.png").is_file()
    assert json.loads((out / "manifest.json").read_text())["summary"]["labelled"] == 1
