"""Class-aware attention affinity: Sinkhorn affinity, box masks, refinement, upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipes.caa import box_mask, refine_cams, sinkhorn_affinity, upsample
from clipes.masks import class_argmax


def test_sinkhorn_affinity_is_the_reference_recipe():
    torch.manual_seed(0)
    attn = torch.rand(30, 30).softmax(dim=-1)
    t = attn.clone()
    for _ in range(3):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    np.testing.assert_allclose(sinkhorn_affinity(attn), t @ t, rtol=1e-6, atol=1e-9)
    out = sinkhorn_affinity(attn)
    np.testing.assert_allclose(out, out.T, atol=1e-7)
    np.testing.assert_allclose(out.sum(1), torch.ones(30), atol=1e-2)


def test_sinkhorn_affinity_batched():
    attn = torch.rand(3, 12, 12)
    batched = sinkhorn_affinity(attn)
    for i in range(3):
        np.testing.assert_allclose(batched[i], sinkhorn_affinity(attn[i]), rtol=1e-6)


def _mask(cam: np.ndarray, thr: float = 0.4) -> np.ndarray:
    t = torch.from_numpy(cam.astype(np.float32))[None]
    return box_mask(t, thr)[0].view(cam.shape).numpy()


def test_box_mask_interior_region_covers_its_box():
    cam = np.zeros((8, 8))
    cam[2:5, 3:6] = 1.0
    expected = np.zeros((8, 8))
    expected[2:5, 3:6] = 1
    np.testing.assert_array_equal(_mask(cam), expected)


def test_box_mask_drops_last_row_and_column_at_the_border():
    cam = np.zeros((6, 6))
    cam[3:6, 4:6] = 1.0  # touches the bottom and right borders
    expected = np.zeros((6, 6))
    expected[3:5, 4:5] = 1  # x1 = min(6, W - 1) = 5, y1 = min(6, H - 1) = 5
    np.testing.assert_array_equal(_mask(cam), expected)


def test_box_mask_regions_are_8_connected_and_holes_filled():
    cam = np.zeros((9, 9))
    cam[1, 1] = cam[2, 2] = cam[3, 3] = 1.0  # diagonal chain: one region
    cam[5:8, 5:8] = 1.0
    cam[6, 6] = 0.0  # a hole stays inside the box
    expected = np.zeros((9, 9))
    expected[1:4, 1:4] = 1
    expected[5:8, 5:8] = 1
    np.testing.assert_array_equal(_mask(cam), expected)


def test_box_mask_threshold_is_strict_on_uint8_values():
    cam = np.zeros((5, 5))
    cam[0, 0] = 1.0  # uint8 255, so the threshold is int(0.4 * 255) = 102
    cam[2, 3] = 102.5 / 255  # uint8 102: not above the threshold
    cam[2, 1] = 103.5 / 255  # uint8 103: above
    m = _mask(cam)
    assert m[0, 0] == 1 and m[2, 1] == 1
    assert m[2, 3] == 0
    assert m.sum() == 2


def test_box_mask_empty_when_no_region():
    np.testing.assert_array_equal(_mask(np.zeros((5, 5))), np.zeros((5, 5)))


def test_refine_cams_equals_column_masked_product():
    torch.manual_seed(1)
    n, k = 20, 3
    t = sinkhorn_affinity(torch.rand(n, n))
    cam = torch.rand(k, 4, 5)
    mask = (torch.rand(k, n) > 0.5).float()
    out = refine_cams(t, cam, mask)
    for i in range(k):
        ref = ((t * mask[i][None, :]) @ cam[i].reshape(-1, 1)).reshape(4, 5)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-7)


def test_upsample_normalises_then_resizes_with_half_pixel_centres():
    x = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    up = upsample(x, (4, 4))
    norm = (x - 1) / (8 + 1e-7)
    np.testing.assert_allclose(up, F.interpolate(norm[None], size=(4, 4), mode="bilinear")[0], atol=1e-7)
    # half-pixel centres: the corner keeps the corner value, the next pixel is a 3:1 blend
    assert abs(float(up[0, 0, 0]) - 0.0) < 1e-7
    assert abs(float(up[0, 0, 1]) - 0.25 * 0.25) < 1e-6


def _scipy_boxes(binary: np.ndarray) -> np.ndarray:
    """Oracle: scipy's 8-connected labelling and bounding slices, clipped as the reference does."""
    from scipy import ndimage

    h, w = binary.shape
    out = np.zeros((h, w), dtype=np.float32)
    labelled, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    for ys, xs in ndimage.find_objects(labelled)[:count]:
        out[ys.start:min(ys.stop, h - 1), xs.start:min(xs.stop, w - 1)] = 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_box_mask_matches_scipy_labelling_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    # smooth random fields give blobs, spirals and touching regions of many shapes
    field = torch.from_numpy(rng.random((3, h, w)).astype(np.float32))
    field = F.avg_pool2d(field[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    cams = (field - field.amin(dim=(1, 2), keepdim=True)) / (field.amax(dim=(1, 2), keepdim=True)
                                                              - field.amin(dim=(1, 2), keepdim=True) + 1e-7)
    masks = box_mask(cams, 0.4).view(3, h, w).numpy()
    q = (cams.numpy() * 255).astype(np.uint8)
    for k in range(3):
        binary = q[k] > int(0.4 * int(q[k].max()))
        np.testing.assert_array_equal(masks[k], _scipy_boxes(binary))


def test_box_mask_handles_a_serpentine_region():
    cam = np.zeros((9, 9))
    cam[0, :8] = cam[2, 1:] = cam[4, :8] = cam[6, 1:] = 1.0  # rows joined at alternating ends
    cam[1, 7] = cam[3, 1] = cam[5, 7] = 1.0
    expected = np.zeros((9, 9))
    expected[0:7, 0:8] = 1  # one region: rows 0..6, cols 0..8 -> clipped to [0, 8)
    np.testing.assert_array_equal(_mask(cam), expected)


def test_class_argmax_is_argmax_with_first_maximum_on_ties():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 4, (5, 37, 41)).astype(np.float32))  # many ties
    expected = np.argmax(scores.numpy(), axis=0)  # numpy, as the reference: first maximum wins
    np.testing.assert_array_equal(class_argmax(scores).numpy(), expected)
    np.testing.assert_array_equal(class_argmax(scores).numpy(), scores.argmax(0).numpy())


@pytest.mark.parametrize("rounds", [1, 3, 8])
def test_components_do_not_depend_on_how_often_convergence_is_checked(rounds):
    from clipes.caa import _components

    g = torch.Generator().manual_seed(rounds)
    binary = torch.rand((4, 23, 31), generator=g) > 0.45
    np.testing.assert_array_equal(_components(binary, rounds).numpy(), _components(binary, 1).numpy())
