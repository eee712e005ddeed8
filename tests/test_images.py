"""Images of every PIL mode, EXIF orientation, tiny and corrupt files, and the reference resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipes.images import CLIP_MEAN, CLIP_STD, ImageError, input_size, preprocess, read_image


def _save(tmp_path, img: Image.Image, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(("mode", "name"), [
    ("L", "g.png"), ("P", "p.png"), ("RGBA", "a.png"), ("CMYK", "c.jpg"), ("LA", "la.png"), ("1", "b.png"),
    ("I;16", "i16.png"), ("RGB", "x.webp"), ("RGB", "x.bmp"), ("RGB", "x.tiff"),
])
def test_every_mode_reads_as_rgb_or_gray(tmp_path, mode, name):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (21, 34, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(
        rng.integers(0, 65535, (21, 34), dtype=np.uint16))
    out = read_image(_save(tmp_path, img, name))
    assert out.mode in ("RGB", "L") and out.size == (34, 21)
    x = preprocess(out)
    assert x.shape == (3, 32, 48) and torch.isfinite(x).all()


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    out = read_image(_save(tmp_path, Image.fromarray(arr), "half.png"))
    assert out.mode == "L" and abs(int(np.asarray(out)[0, 0]) - 127) <= 1


def test_exif_orientation_is_applied_unless_ignored(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, img, "rot.jpg", exif=exif.tobytes())
    assert read_image(path).size == (20, 40)
    assert read_image(path, exif_transpose=False).size == (40, 20)


def test_corrupt_and_non_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        read_image(bad)
    good = _save(tmp_path, Image.new("RGB", (50, 50)), "trunc.png")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        read_image(good)


def test_tiny_image_gets_one_patch(tmp_path):
    out = read_image(_save(tmp_path, Image.new("RGB", (1, 1), "white"), "dot.png"))
    assert preprocess(out).shape == (3, 16, 16)


def test_input_size_rounds_up_and_caps_the_longer_side():
    assert input_size(513, 513, 16) == (528, 528)
    assert input_size(400, 600, 16) == (400, 608)
    assert input_size(3000, 1500, 16, max_side=1024) == (1024, 512)
    assert input_size(300, 200, 16, max_side=1024) == (304, 208)


def test_preprocess_is_bicubic_resize_then_clip_normalisation():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    x = preprocess(img)
    ref = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)
