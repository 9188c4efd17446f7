"""Retrieval R@K: a hand-ranked matrix with multi-caption images, a naive argsort cross-check, and the
COCO 1K (5-fold mean) vs 5K protocol on a structured 5000-image case."""

import pytest
import torch

from mmf_plugins.metrics.retrieval import coco_1k_5k, retrieval_ranks, retrieval_recall

# 3 images x 6 texts; image 0 owns texts 0-1, image 1 texts 2-3, image 2 texts 4-5.
SCORES = torch.tensor(
    [
        [0.90, 0.10, 0.80, 0.20, 0.30, 0.00],  # best GT t0 ranks first (t1 ranks 4th: ANY caption counts)
        [0.70, 0.60, 0.50, 0.40, 0.90, 0.80],  # best GT t2 (.5) beaten by t0, t1, t4, t5 -> rank 4
        [0.20, 0.30, 0.10, 0.00, 0.40, 0.95],  # best GT t5 ranks first
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


def test_ranks_by_hand():
    i2t, t2i = retrieval_ranks(SCORES, TEXT_TO_IMAGE)
    assert i2t.tolist() == [0, 4, 0]
    # column-wise, images beating the GT image: t0 none, t1 two, t2 one, t3 none, t4 one, t5 none
    assert t2i.tolist() == [0, 2, 1, 0, 1, 0]


def test_recall_by_hand():
    out = retrieval_recall(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 5))
    assert out["r1_i2t"] == pytest.approx(200 / 3)
    assert out["r2_i2t"] == pytest.approx(200 / 3)
    assert out["r5_i2t"] == pytest.approx(100.0)
    assert out["r1_t2i"] == pytest.approx(50.0)
    assert out["r2_t2i"] == pytest.approx(500 / 6)
    assert out["r5_t2i"] == pytest.approx(100.0)
    assert out["rsum"] == pytest.approx(200 / 3 * 2 + 100 + 50 + 500 / 6 + 100)
    assert list(out) == ["r1_i2t", "r2_i2t", "r5_i2t", "r1_t2i", "r2_t2i", "r5_t2i", "rsum"]


def test_ties_count_against_the_model():
    out = retrieval_recall(torch.zeros(3, 6), TEXT_TO_IMAGE, ks=(1,))
    assert out["r1_i2t"] == 0.0 and out["r1_t2i"] == 0.0


def _naive(scores, t2i, k):
    """VSE++-style loops with argsort (no ties in random data)."""
    n_img, n_txt = scores.shape
    i2t_hits = 0
    for i in range(n_img):
        order = torch.argsort(scores[i], descending=True).tolist()
        best = min(order.index(t) for t in range(n_txt) if t2i[t] == i)
        i2t_hits += best < k
    t2i_hits = 0
    for t in range(n_txt):
        order = torch.argsort(scores[:, t], descending=True).tolist()
        t2i_hits += order.index(int(t2i[t])) < k
    return 100 * i2t_hits / n_img, 100 * t2i_hits / n_txt


def test_matches_naive_argsort_on_random_scores(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t2i = torch.cat([torch.arange(20), torch.randint(0, 20, (37,), generator=g)])[torch.randperm(57, generator=g)]
    scores = torch.randn(20, 57, generator=g)
    monkeypatch.setattr("mmf_plugins.metrics.retrieval.CHUNK_ELEMENTS", 100)  # several row chunks
    out = retrieval_recall(scores, t2i, ks=(1, 3, 10))
    for k in (1, 3, 10):
        i2t, t2i_r = _naive(scores, t2i, k)
        assert out[f"r{k}_i2t"] == pytest.approx(i2t)
        assert out[f"r{k}_t2i"] == pytest.approx(t2i_r)


def test_coco_1k_is_the_mean_of_five_sequential_folds():
    # 5000 images x 2 captions. GT pair = 1; the same-local-index image of the NEXT fold scores 2 for
    # every caption (a "twin" only visible in 5K); in fold f the first 100*f images have GT score -1
    # (below every within-fold distractor at 0, so they miss at any K).
    n_img, caps = 5000, 2
    t2i = torch.arange(n_img).repeat_interleave(caps)
    texts = torch.arange(n_img * caps)
    fold, local = torch.arange(n_img) // 1000, torch.arange(n_img) % 1000
    scores = torch.zeros(n_img, n_img * caps)
    scores[t2i, texts] = 1.0
    scores[((fold[t2i] + 1) % 5) * 1000 + local[t2i], texts] = 2.0
    lowered = (local < 100 * fold)[t2i]
    scores[t2i[lowered], texts[lowered]] = -1.0

    out = coco_1k_5k(scores, t2i)
    # 1K: fold f keeps (1000 - 100 f)/1000 -> mean over f = 0..4 is 80 % at every K, both directions
    assert out["1k"] == pytest.approx(
        {**{f"r{k}_{d}": 80.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}, "rsum": 480.0}
    )
    # 5K: the twin always ranks first (R@1 = 0); 20 % of the images are lowered (miss at any K)
    assert out["5k"] == pytest.approx(
        {"r1_i2t": 0.0, "r5_i2t": 80.0, "r10_i2t": 80.0, "r1_t2i": 0.0, "r5_t2i": 80.0, "r10_t2i": 80.0, "rsum": 320.0}
    )


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_recall(torch.zeros(6), TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match="one GT image index per text"):
        retrieval_recall(SCORES, TEXT_TO_IMAGE[:5])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_recall(SCORES, torch.tensor([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="no GT text"):
        retrieval_recall(SCORES, torch.tensor([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(SCORES.clone().fill_(float("nan")), TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match="multiple"):
        coco_1k_5k(SCORES, TEXT_TO_IMAGE)
