"""Data-side randomness of OSCAR+ training: contrastive pollution and caption token masking.

Follows microsoft/Oscar ``oscar/datasets/oscar_tsv.py`` (``OscarTSVDataset.random_sent``,
``convert_example_to_features``) and ``oscar/run_captioning.py`` (``CaptionTensorizer``). The
pretraining / captioning datasets call these; the model only reads the resulting fields
(``input_ids``, ``lm_label_ids``, ``contrastive_labels``).

Contrastive labels (OSCAR+ "CL3", VinVL paper §3.2): for a (text_a, text_b, image) triplet with
``u ~ U[0, 1)``: ``u > 0.5`` -> 0 (matched); else if ``u > texta_false_prob`` and text_b is non-empty
-> 1 (text_b replaced by another image's tags, or another QA answer); else -> ``num_contrast_classes - 1``
(text_a replaced by another image's caption). With the released setting ``texta_false_prob = 0.25`` the
frequencies are 0.5 / 0.25 / 0.25. Vanilla OSCAR (``texta_false_prob = 0``) is binary: label 1 = polluted
text_b. If every retry draws a replacement from the same image, the label falls back to 0 (upstream's
``is_img_match`` rule).

Caption masking (captioning fine-tune): ``min(max(round(0.15 * len), 1), 3)`` positions among the
caption tokens after ``[CLS]`` (``[SEP]`` included, as upstream), each replaced by ``[MASK]`` w.p. 0.8,
a random token w.p. 0.1, kept w.p. 0.1; labels hold the original ids there and -1 elsewhere.

Deliberate differences: randomness comes from an explicit ``torch.Generator`` / ``random.Random`` (so
datasets can seed per worker); the caption masking returns MMF-style ``lm_label_ids`` (-1 = not masked)
instead of upstream's ``masked_pos`` / ``masked_ids`` pair (same positions, same loss).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

MATCHED = 0
POLLUTED_TEXT_B = 1


def num_contrast_classes_for(texta_false_prob: float, use_b: bool = True) -> int:
    """Upstream's rule: 3 classes iff ``texta_false_prob < 0.5 and (texta_false_prob > 0 or not use_b)``."""
    return 3 if texta_false_prob < 0.5 and (texta_false_prob > 0 or not use_b) else 2


def draw_contrastive_labels(
    num: int,
    *,
    texta_false_prob: float = 0.25,
    num_contrast_classes: int = 3,
    has_text_b: torch.Tensor | bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num`` contrastive labels (int64): 0 matched, 1 polluted text_b, ``C - 1`` polluted text_a.

    ``has_text_b`` (bool or bool tensor ``(num,)``): rows without a text_b can only be 0 or ``C - 1``.
    """
    if num_contrast_classes not in (2, 3):
        raise ValueError(f"num_contrast_classes must be 2 or 3, got {num_contrast_classes}")
    if not 0.0 <= texta_false_prob <= 0.5:
        raise ValueError(f"texta_false_prob must be in [0, 0.5], got {texta_false_prob}")
    u = torch.rand(num, generator=generator)
    has_b = torch.as_tensor(has_text_b, dtype=torch.bool).expand(num)
    labels = torch.full((num,), num_contrast_classes - 1, dtype=torch.long)
    labels = torch.where((u > texta_false_prob) & has_b, torch.full_like(labels, POLLUTED_TEXT_B), labels)
    labels = torch.where(u > 0.5, torch.full_like(labels, MATCHED), labels)
    return labels


def pollute(
    example: dict,
    label: int,
    *,
    num_contrast_classes: int,
    random_text_a: Callable[[], tuple[str, str]],
    random_text_b: Callable[[], tuple[str, str]],
    max_tries: int = 10,
) -> tuple[dict, int]:
    """Apply a drawn contrastive label to one example.

    ``example`` holds ``image_id``, ``text_a`` and ``text_b``; ``random_text_a()`` / ``random_text_b()``
    return ``(image_id, text)`` of a random caption / tag string (or QA answer) from the corpus. Returns
    the (copied) example with the replaced text and the final label: 0 when every one of ``max_tries``
    draws came from the same image.
    """
    if label == MATCHED:
        return dict(example), MATCHED
    if label == POLLUTED_TEXT_B:
        key, draw = "text_b", random_text_b
    elif label == num_contrast_classes - 1:
        key, draw = "text_a", random_text_a
    else:
        raise ValueError(f"contrastive label {label} is not valid for {num_contrast_classes} classes")
    image_id = example.get("image_id")
    for _ in range(max_tries):
        other_image, text = draw()
        if other_image != image_id:
            out = dict(example)
            out[key] = text
            return out, label
    out = dict(example)
    out[key] = text
    return out, MATCHED


def keep_text_b_mlm_labels(label: int, mask_loss_for_unmatched: bool = True) -> bool:
    """Upstream drops the MLM labels of a polluted text_b unless ``mask_loss_for_unmatched`` (default on)."""
    return bool(mask_loss_for_unmatched) or label != POLLUTED_TEXT_B


def num_caption_masks(caption_length: int, mask_prob: float = 0.15, max_masked_tokens: int = 3) -> int:
    """``min(max(round(mask_prob * len), 1), max)`` with Python's round (half to even), as upstream."""
    return int(min(max(round(mask_prob * caption_length), 1), max_masked_tokens))


def mask_caption_tokens(
    input_ids: torch.Tensor,
    caption_length: int,
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    max_masked_tokens: int = 3,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask caption tokens of one example for captioning training.

    ``input_ids (T,)`` starts with ``[CLS] caption [SEP]`` of ``caption_length`` tokens (both specials
    counted). Returns ``(masked_input_ids, lm_label_ids)``; ``lm_label_ids`` is -1 outside the masked
    positions.
    """
    if caption_length < 2 or caption_length > input_ids.numel():
        raise ValueError(
            f"caption_length {caption_length} must count [CLS] and [SEP] and fit in input_ids of length {input_ids.numel()}"
        )
    rng = rng or random
    positions = list(range(1, caption_length))
    rng.shuffle(positions)
    chosen = sorted(positions[: num_caption_masks(caption_length, mask_prob, max_masked_tokens)])
    masked = input_ids.clone()
    labels = torch.full_like(input_ids, -1)
    for pos in chosen:
        labels[pos] = input_ids[pos]
        if rng.random() <= 0.8:
            masked[pos] = mask_token_id
        elif rng.random() <= 0.5:
            masked[pos] = rng.randrange(vocab_size)
    return masked, labels


def sample_other(items: Sequence, rng: random.Random | None = None) -> Callable[[], tuple[str, str]]:
    """A ``random_text_a`` / ``random_text_b`` callable over ``[(image_id, text), ...]``."""
    if not items:
        raise ValueError("cannot draw replacement texts from an empty corpus")
    rng = rng or random

    def draw() -> tuple[str, str]:
        return items[rng.randrange(len(items))]

    return draw
