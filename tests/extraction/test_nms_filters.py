"""NMS filter modes of the VinVL detector against hand-built cases and slow reference loops."""

import pytest
import torch
from torchvision.ops import nms

from mmf_plugins.extraction.detectors.vinvl import (
    batched_class_nms,
    filter_best_class,
    filter_class_agnostic,
    filter_per_class,
    select_attributes,
)

# three boxes: A and B overlap (IoU 81/119 = 0.68), C is apart
BOXES = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
# columns: background, class 1, class 2, class 3
SCORES = torch.tensor(
    [
        [0.10, 0.60, 0.30, 0.00],  # A: best class 1
        [0.10, 0.50, 0.40, 0.00],  # B: best class 1 (suppressed there by A), class 2 survives
        [0.70, 0.10, 0.05, 0.15],  # C: alone, best class 3 below the 0.2 threshold
    ]
)


def ref_class_nms(boxes, scores, thr, valid=None):
    """Per-class torchvision NMS, one class at a time (the original's loop)."""
    n, c = scores.shape
    keep = torch.zeros(n, c, dtype=torch.bool)
    for j in range(c):
        idx = torch.arange(n) if valid is None else valid[:, j].nonzero().squeeze(1)
        b = boxes if boxes.dim() == 2 else boxes[:, j]
        keep[idx[nms(b[idx], scores[idx, j], thr)], j] = True
    return keep


def ref_best_class(boxes, scores, thresh, min_boxes, max_boxes):
    """maskrcnn-benchmark filter_results_peter, written with its loop over classes."""
    c = scores.shape[1]
    mask = torch.zeros_like(scores)
    for j in range(1, c):
        b = boxes if boxes.dim() == 2 else boxes[:, j]
        mask[nms(b, scores[:, j], 0.3), j] = 1
    best, labels = (mask * scores).max(1)
    inds = best.nonzero().squeeze(1)
    best, labels = best[inds], labels[inds]
    _, order = best.sort(descending=True)
    n_hi = int((best >= thresh).sum())
    k = min(max(n_hi, min_boxes), max_boxes)
    return inds[order[:k]], labels[order[:k]], best[order[:k]]


def test_best_class_keeps_best_surviving_class():
    det = filter_best_class(BOXES, SCORES, score_thresh=0.2, min_boxes=1, max_boxes=10)
    assert det.index.tolist() == [0, 1]
    assert det.labels.tolist() == [1, 2]  # B loses class 1 to A and keeps class 2
    assert torch.allclose(det.scores, torch.tensor([0.6, 0.4]))
    # fewer than min_boxes above the threshold: the next best box comes in
    det = filter_best_class(BOXES, SCORES, score_thresh=0.2, min_boxes=3, max_boxes=10)
    assert det.index.tolist() == [0, 1, 2] and det.labels.tolist() == [1, 2, 3]
    det = filter_best_class(BOXES, SCORES, score_thresh=0.2, min_boxes=0, max_boxes=1)
    assert det.index.tolist() == [0]


def test_class_agnostic_suppresses_across_classes():
    det = filter_class_agnostic(BOXES, SCORES, score_thresh=0.2, nms_thresh=0.5, min_boxes=1, max_boxes=10)
    assert det.index.tolist() == [0] and det.labels.tolist() == [1]  # B is gone: one NMS over boxes
    det = filter_class_agnostic(BOXES, SCORES, score_thresh=0.2, nms_thresh=0.5, min_boxes=2, max_boxes=10)
    assert det.index.tolist() == [0, 2] and det.labels.tolist() == [1, 3]
    assert torch.allclose(det.scores, torch.tensor([0.6, 0.15]))
    assert torch.equal(det.boxes, BOXES[[0, 2]])


def test_per_class_mode_and_threshold_retry():
    det = filter_per_class(BOXES, SCORES, score_thresh=0.2, nms_thresh=0.5, min_boxes=1, max_boxes=10)
    assert list(zip(det.index.tolist(), det.labels.tolist())) == [(0, 1), (1, 2)]
    # min_boxes=3: threshold halves to 0.1, C/class 3 (0.15) enters
    det = filter_per_class(BOXES, SCORES, score_thresh=0.2, nms_thresh=0.5, min_boxes=3, max_boxes=10)
    assert list(zip(det.index.tolist(), det.labels.tolist())) == [(0, 1), (1, 2), (2, 3)]


def test_class_specific_boxes_change_survivors():
    per_class = BOXES[:, None, :].repeat(1, 4, 1)
    per_class[1, 1] = torch.tensor([30.0, 0, 40, 10])  # B's class-1 box moves away from A's
    det = filter_best_class(per_class, SCORES, score_thresh=0.2, min_boxes=1, max_boxes=10)
    assert det.labels.tolist() == [1, 1]  # now B keeps class 1
    assert torch.equal(det.boxes[1], torch.tensor([30.0, 0, 40, 10]))


def _random_case(n, c, seed, class_specific):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    if class_specific:
        boxes = boxes[:, None] + torch.randn(n, c, 4, generator=g) * 4
    scores = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)
    return boxes, scores


@pytest.mark.parametrize("class_specific", [False, True])
def test_batched_class_nms_equals_per_class_loop(class_specific):
    for seed in range(3):
        boxes, scores = _random_case(70, 33, seed, class_specific)
        for thr in (0.3, 0.7):
            assert torch.equal(batched_class_nms(boxes, scores, thr), ref_class_nms(boxes, scores, thr))
            valid = scores > 0.02
            assert torch.equal(
                batched_class_nms(boxes, scores, thr, valid=valid), ref_class_nms(boxes, scores, thr, valid)
            )


@pytest.mark.parametrize("class_specific", [False, True])
def test_best_class_filter_equals_reference_loop(class_specific):
    for seed in range(3):
        boxes, scores = _random_case(80, 41, seed + 10, class_specific)
        for min_boxes, max_boxes in ((10, 100), (5, 12)):
            det = filter_best_class(boxes, scores, score_thresh=0.2, min_boxes=min_boxes, max_boxes=max_boxes)
            index, labels, best = ref_best_class(boxes, scores, 0.2, min_boxes, max_boxes)
            assert torch.equal(det.index, index) and torch.equal(det.labels, labels)
            assert torch.allclose(det.scores, best)


def test_best_class_flat_scores_fall_back_to_all_pairs():
    # every class probability (~1/1595) is below the pre-filter floor (0.01 * 0.2): the exact all-pairs pass runs
    boxes, _ = _random_case(40, 2, 3, False)
    scores = torch.softmax(torch.randn(40, 1595, generator=torch.Generator().manual_seed(0)) * 0.05, dim=1)
    assert scores[:, 1:].max() < 0.002
    det = filter_best_class(boxes, scores, score_thresh=0.2, min_boxes=10, max_boxes=100)
    index, labels, _ = ref_best_class(boxes, scores, 0.2, 10, 100)
    assert len(det) == 10 and torch.equal(det.index, index) and torch.equal(det.labels, labels)


def test_per_class_and_agnostic_filters_equal_reference_loops():
    boxes, scores = _random_case(90, 21, 5, False)
    det = filter_per_class(boxes, scores, score_thresh=0.05, nms_thresh=0.5, min_boxes=0, max_boxes=1000)
    pairs = set()
    for j in range(1, scores.shape[1]):  # the original: threshold, then NMS class by class
        idx = (scores[:, j] > 0.05).nonzero().squeeze(1)
        pairs |= {(int(i), j) for i in idx[nms(boxes[idx], scores[idx, j], 0.5)]}
    assert set(zip(det.index.tolist(), det.labels.tolist())) == pairs
    assert (det.scores[:-1] >= det.scores[1:]).all()

    det = filter_class_agnostic(boxes, scores, score_thresh=0.2, nms_thresh=0.5, min_boxes=10, max_boxes=100)
    best, _ = scores[:, 1:].max(1)
    cand = (best > 0.002).nonzero().squeeze(1)
    kept = cand[nms(boxes[cand], best[cand], 0.5)]
    k = min(max(int((best[kept] >= 0.2).sum()), 10), 100)
    assert det.index.tolist() == kept[:k].tolist()


def test_attribute_selection():
    probs = torch.tensor([[0.5, 0.3, 0.04, 0.16], [0.9, 0.02, 0.06, 0.02]])
    labels, scores = select_attributes(probs, thresh=0.05, max_per_obj=3, max_per_img=100)
    # column 0 (no attribute) never selected; below-threshold slots report id 0 with score 0
    assert labels.tolist() == [[1, 3, 0], [2, 0, 0]]
    assert torch.allclose(scores, torch.tensor([[0.3, 0.16, 0.0], [0.06, 0.0, 0.0]]))
    labels, scores = select_attributes(probs, thresh=0.05, max_per_obj=3, max_per_img=2)  # image cap
    assert labels.tolist() == [[1, 3, 0], [0, 0, 0]]
