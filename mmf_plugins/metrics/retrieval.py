"""Image-text retrieval recall (R@K), image->text and text->image, with the COCO 1K/5K protocol.

Follows the protocol of VSE++ (fartashf/vsepp ``evaluation.py`` ``i2t``/``t2i``), used by
Oscar/VinVL, ALBEF/BLIP/LAVIS and SOHO: image->text is a hit when ANY of the image's ground-truth
(GT) captions ranks in the top K; text->image is a hit when the text's one GT image ranks in the top
K. COCO reports "5K" (all 5,000 Karpathy test images, 25,000 captions) and "1K" = the mean over 5
sequential folds of 1,000 images with their captions (never a single 1K subset).

Deliberate differences: ranks are computed without sorting (count of scores that beat the GT), in
row chunks so a 5,000 x 25,000 matrix needs no 1 GB argsort; a tie between a GT item and a wrong one
counts against the model (VSE++'s argsort breaks ties by index), so a constant scorer gets R@K ~ K/N,
never 100. Recalls are percentages and ``rsum`` is their sum (0..600), as papers report them.
"""

from __future__ import annotations

import torch

# Elements per comparison chunk (bool), bounds the temporaries to a few tens of MB.
CHUNK_ELEMENTS = 1 << 22


def _check_inputs(scores: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"scores must be a 2-D tensor [n_images, n_texts], got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    n_images, n_texts = scores.shape
    if not isinstance(text_to_image, torch.Tensor) or text_to_image.shape != (n_texts,):
        raise ValueError(
            f"text_to_image must be a 1-D tensor with one GT image index per text ({n_texts} texts), got "
            f"{tuple(text_to_image.shape) if isinstance(text_to_image, torch.Tensor) else type(text_to_image).__name__}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if n_texts and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_images):
        raise ValueError(
            f"text_to_image values must be image indices in [0, {n_images}), got range "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}]"
        )
    if torch.isnan(scores).any():
        raise ValueError(f"scores hold {int(torch.isnan(scores).sum())} NaN values; fix the model output first")


def retrieval_ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the best GT item for every query.

    Args:
        scores: ``(n_images, n_texts)`` similarity, higher = more similar.
        text_to_image: ``(n_texts,)`` int, the GT image index of each text.

    Returns:
        ``(i2t_rank (n_images,), t2i_rank (n_texts,))``: for image i, the number of non-GT texts scoring
        >= its best GT caption; for text t, the number of other images scoring >= its GT image.
    """
    _check_inputs(scores, text_to_image)
    n_images, n_texts = scores.shape
    text_to_image = text_to_image.to(device=scores.device, dtype=torch.long)
    counts = torch.bincount(text_to_image, minlength=n_images)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"{int((counts == 0).sum())} images have no GT text (e.g. image indices {empty}); "
            "image->text recall needs at least one caption per image: drop those images"
        )
    gt_scores = scores[text_to_image, torch.arange(n_texts, device=scores.device)]  # (n_texts,)
    best_gt = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_gt = best_gt.scatter_reduce(0, text_to_image, gt_scores, reduce="amax")  # (n_images,)

    i2t_rank = torch.empty(n_images, dtype=torch.long, device=scores.device)
    t2i_beaten = torch.zeros(n_texts, dtype=torch.long, device=scores.device)
    rows = max(1, CHUNK_ELEMENTS // max(n_texts, 1))
    for start in range(0, n_images, rows):
        block = scores[start : start + rows]  # (r, n_texts)
        image_idx = torch.arange(start, start + block.shape[0], device=scores.device)
        is_gt = text_to_image[None, :] == image_idx[:, None]  # (r, n_texts)
        i2t_rank[start : start + block.shape[0]] = ((block >= best_gt[start : start + rows, None]) & ~is_gt).sum(1)
        t2i_beaten += ((block >= gt_scores[None, :]) & ~is_gt).sum(0)
    return i2t_rank, t2i_beaten


def retrieval_recall(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """R@K in percent: ``r{k}_i2t`` (image query, hit if any GT caption in top K), ``r{k}_t2i`` and
    ``rsum`` (sum of all of them). ``scores`` is ``(n_images, n_texts)``, ``text_to_image`` ``(n_texts,)``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    i2t_rank, t2i_rank = retrieval_ranks(scores, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"r{k}_i2t"] = 100.0 * (i2t_rank < k).double().mean().item()
    for k in ks:
        out[f"r{k}_t2i"] = 100.0 * (t2i_rank < k).double().mean().item()
    out["rsum"] = sum(out.values())
    return out


def coco_1k_5k(
    scores: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    fold_size: int = 1000,
) -> dict[str, dict[str, float]]:
    """COCO Karpathy-test protocol: ``{"5k": recall on all images, "1k": mean recall over the
    sequential folds of ``fold_size`` images (images [0, 1000), [1000, 2000), ...) with their captions}``.

    ``n_images`` must be a multiple of ``fold_size`` (5,000 for COCO 5K).
    """
    _check_inputs(scores, text_to_image)
    n_images = scores.shape[0]
    if fold_size < 1 or n_images % fold_size:
        raise ValueError(
            f"the 1K protocol splits the images into folds of {fold_size}; {n_images} images is not a multiple "
            "(COCO Karpathy test has 5000 images; evaluate the whole test split)"
        )
    text_to_image = text_to_image.to(device=scores.device, dtype=torch.long)
    folds = []
    for fold in range(n_images // fold_size):
        start = fold * fold_size
        in_fold = (text_to_image >= start) & (text_to_image < start + fold_size)
        folds.append(
            retrieval_recall(scores[start : start + fold_size][:, in_fold], text_to_image[in_fold] - start, ks)
        )
    one_k = {key: sum(f[key] for f in folds) / len(folds) for key in folds[0]}
    return {"5k": retrieval_recall(scores, text_to_image, ks), "1k": one_k}
