"""Captioning text inputs for VinVL / OSCAR+ (registered ``vinvl_caption``), and their decoding.

Follows microsoft/Oscar ``oscar/run_captioning.py`` ``CaptionTensorizer.tensorize_example`` (model
references §1.2): the caption part ``[CLS] caption [SEP]`` is padded with ``[PAD]`` to
``max_seq_a_length`` (segment 0), then the object tags ``tags [SEP]`` follow (segment 1), then
``[PAD]`` up to ``max_seq_length``. Training masks ``min(max(round(0.15 * len), 1), 3)`` caption
tokens after ``[CLS]`` (``[SEP]`` included, never ``[CLS]``; 80/10/10 ``[MASK]``/random/keep) with
``models.vinvl.pretraining_data.mask_caption_tokens``. Evaluation items carry no caption: only the
``[CLS]`` prefix and the tags, which is all ``VinVLModel.generate`` reads.

Output (long tensors of length ``max_seq_length``), exactly what ``VinVLModel``'s captioning head reads:
``input_ids``, ``input_mask`` (1 on ``[CLS] caption [SEP]`` and on ``tags [SEP]``, 0 on both paddings),
``segment_ids`` (0 caption and paddings, 1 tags), ``lm_label_ids`` (original id at masked positions, -1
elsewhere); plus ``caption_len`` (caption tokens with ``[CLS]``/``[SEP]``; 1 in eval) and ``text``.

Deliberate differences from the release: MMF-style ``lm_label_ids`` replace upstream's
``masked_pos``/``masked_ids`` pair (same positions, same loss; the model gathers the masked rows); the
3-D attention mask and the tag position ids are built in the model from ``input_mask`` and
``segment_ids``, not here; the masking draws come from a ``random.Random`` seeded from torch's global
generator, so the trainer's per-item seeding makes them reproducible (upstream uses the unseeded
``random`` module). Train vs eval follows the split the processor is built for (``dataset_type``), or
``params.mode`` when set.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.models.vinvl.pretraining_data import mask_caption_tokens
from mmf_plugins.processors.base_processor import BaseProcessor
from mmf_plugins.processors.text_processors import _as_text, _TokenizerMixin, check_processor_params

MODES = ("auto", "train", "eval")


@registry.register_processor("vinvl_caption")
class VinVLCaptionProcessor(_TokenizerMixin, BaseProcessor):
    """``{"text": caption, "text_b": tags?}`` -> VinVL captioning inputs (see the module docstring).

    Params: ``tokenizer_config {type, params: {do_lower_case}}``, ``max_seq_length`` (70),
    ``max_seq_a_length`` (40; keep it equal to ``model_config.vinvl.max_caption_length``),
    ``mask_probability`` (0.15; 0 = no masking, lm_label_ids all -1), ``max_masked_tokens`` (3), ``mode`` (``auto``: mask on the train split
    only; ``train``: always mask; ``eval``: never a caption). ``decode`` / ``batch_decode`` turn generated
    ids back into text.
    """

    PARAMS = ("tokenizer_config", "max_seq_length", "max_seq_a_length", "mask_probability", "max_masked_tokens", "mode")

    def __init__(self, config=None, *args, data_dir: str | None = None, dataset_type: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "vinvl_caption")
        self.max_seq_length = int(self.config.get("max_seq_length", 70))
        self.max_seq_a_length = int(self.config.get("max_seq_a_length", 40))
        if self.max_seq_a_length < 2 or self.max_seq_length < self.max_seq_a_length + 1:
            raise ValueError(
                f"vinvl_caption needs max_seq_a_length >= 2 ([CLS] [SEP]) and max_seq_length >= max_seq_a_length + 1 "
                f"(room for the tags' [SEP]); got max_seq_a_length={self.max_seq_a_length}, "
                f"max_seq_length={self.max_seq_length}"
            )
        self.mask_probability = float(self.config.get("mask_probability", 0.15))
        self.max_masked_tokens = int(self.config.get("max_masked_tokens", 3))
        if not 0.0 <= self.mask_probability <= 1.0 or self.max_masked_tokens < 1:
            raise ValueError(
                f"vinvl_caption: mask_probability must be in [0, 1] and max_masked_tokens >= 1, got "
                f"{self.mask_probability} and {self.max_masked_tokens}"
            )
        mode = str(self.config.get("mode", "auto"))
        if mode not in MODES:
            raise ValueError(f"vinvl_caption params.mode={mode!r}; expected one of {', '.join(MODES)}")
        self.train = (dataset_type == "train") if mode == "auto" else mode == "train"
        self._init_tokenizer(data_dir)

    # ----------------------------------------------------------------------------- encode
    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "text" not in item and self.train:
            raise KeyError(f"vinvl_caption (train) expects {{'text': caption, 'text_b': tags?}}, got keys {sorted(item)}")
        text = _as_text(item.get("text", "") or "", "text")
        caption = [self.cls_id]
        if self.train:
            caption += [*self._encode(text)[: self.max_seq_a_length - 2], self.sep_id]
        caption_len = len(caption)
        tags_text = item.get("text_b", None)
        tags = self._encode(_as_text(tags_text, "text_b")) if tags_text else []
        tags = [*tags[: self.max_seq_length - self.max_seq_a_length - 1], self.sep_id]

        L, A = self.max_seq_length, self.max_seq_a_length
        input_ids = torch.full((L,), self.pad_id, dtype=torch.long)
        input_ids[:caption_len] = torch.tensor(caption, dtype=torch.long)
        input_ids[A : A + len(tags)] = torch.tensor(tags, dtype=torch.long)
        input_mask = torch.zeros(L, dtype=torch.long)
        input_mask[:caption_len] = 1
        input_mask[A : A + len(tags)] = 1
        segment_ids = torch.zeros(L, dtype=torch.long)
        segment_ids[A : A + len(tags)] = 1
        if self.train and self.mask_probability > 0:
            # a per-item generator drawn from torch's (reseeded per item by the trainer)
            rng = random.Random(int(torch.randint(2**62, ())))
            input_ids, lm_label_ids = mask_caption_tokens(
                input_ids, caption_len, mask_token_id=self.mask_id, vocab_size=self.vocab_size,
                mask_prob=self.mask_probability, max_masked_tokens=self.max_masked_tokens, rng=rng,
            )
        else:
            lm_label_ids = torch.full((L,), -1, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "input_mask": input_mask,
            "segment_ids": segment_ids,
            "lm_label_ids": lm_label_ids,
            "caption_len": caption_len,
            "text": text,
        }

    # ----------------------------------------------------------------------------- decode
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids -> text: stops at the first ``[SEP]``, drops ``[CLS]``/``[PAD]``, joins ``##`` pieces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.sep_id:
                break
            if token_id not in (self.cls_id, self.pad_id):
                kept.append(token_id)
        return self.tokenizer.decode(kept, clean_up_tokenization_spaces=False).strip()

    def batch_decode(self, batch: Iterable[Sequence[int]] | torch.Tensor) -> list[str]:
        """``(B, L)`` ids -> ``B`` strings (``(B, K, L)``: the first of the ``K`` kept captions of each row)."""
        if isinstance(batch, torch.Tensor):
            if batch.dim() == 3:
                batch = batch[:, 0]
            if batch.dim() != 2:
                raise ValueError(f"batch_decode expects (B, L) or (B, K, L) ids, got shape {tuple(batch.shape)}")
            batch = batch.tolist()
        return [self.decode(row) for row in batch]
