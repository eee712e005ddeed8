"""mIoU and friends against hand-computed confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest

from clipes.evaluate import confusion, scores


def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]], dtype=np.uint8)
    hist = confusion(pred, gt, 3)
    expected = np.array([[2, 1, 0, 0],   # gt 0: two right, one called 1
                         [0, 2, 0, 0],   # gt 1: both right
                         [1, 0, 1, 0]])  # gt 2: one right, one called 0; the 255 pixel is ignored
    np.testing.assert_array_equal(hist, expected)
    sc = scores(hist)
    np.testing.assert_allclose(sc.iou, [2 / 4, 2 / 3, 1 / 2])
    np.testing.assert_allclose(sc.precision, [2 / 3, 2 / 3, 1 / 1])
    np.testing.assert_allclose(sc.recall, [2 / 3, 2 / 2, 1 / 2])
    assert sc.miou == pytest.approx(np.mean([1 / 2, 2 / 3, 1 / 2]))
    assert sc.pixel_accuracy == pytest.approx(5 / 7)


def test_classes_absent_from_ground_truth_do_not_count():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 3, 1, 1]], dtype=np.uint8)  # class 3 predicted, never in the ground truth
    sc = scores(confusion(pred, gt, 4))
    assert sc.present.tolist() == [True, True, False, False]
    assert sc.iou[3] == 0 and np.isnan(sc.iou[2])
    assert sc.miou == pytest.approx(np.mean([1 / 2, 1.0]))


def test_unlabelled_predictions_are_misses():
    gt = np.array([[1, 1, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 255, 0, 255]], dtype=np.uint8)  # 255: pixels a CGL mask leaves out
    hist = confusion(pred, gt, 2)
    np.testing.assert_array_equal(hist, [[1, 0, 1], [0, 1, 1]])
    sc = scores(hist)
    np.testing.assert_allclose(sc.iou, [1 / 2, 1 / 2])
    assert sc.pixel_accuracy == pytest.approx(1 / 2)


def test_all_void_ground_truth_contributes_nothing():
    gt = np.full((3, 3), 255, dtype=np.uint8)
    hist = confusion(np.zeros((3, 3), dtype=np.uint8), gt, 21)
    assert hist.sum() == 0
    sc = scores(hist)
    assert np.isnan(sc.miou) and not sc.present.any() and np.isnan(sc.pixel_accuracy)


def test_coco_81_classes():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 81, (50, 60)).astype(np.uint8)
    pred = gt.copy()
    pred[:10] = (pred[:10] + 1) % 81
    hist = confusion(pred, gt, 81)
    assert hist.shape == (81, 82) and hist.sum() == gt.size
    sc = scores(hist)
    # brute force per class
    for c in range(81):
        inter = np.sum((gt == c) & (pred == c))
        union = np.sum((gt == c) | (pred == c))
        if (gt == c).any():
            assert sc.iou[c] == pytest.approx(inter / union)
    assert sc.miou == pytest.approx(np.mean([sc.iou[c] for c in range(81) if (gt == c).any()]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in size"):
        confusion(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="values >= 3"):
        confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8), 3)
