"""BERT fusion encoder for single-stream vision-language models, built from transformers' BERT pieces.

SOHO (researchmm/soho ``SOHO/models/languages/bert.py`` ``VLBert``), OSCAR/VinVL (``BertImgModel``) and
VL-BERT all do the same thing: build text embeddings with BERT's embedding layer (word + position +
token type -> LayerNorm -> dropout), concatenate visual tokens they built themselves, and run the
BERT layer stack over the joint sequence with one padding mask (additive ``(1 - m) * -10000``).
:class:`BertFusionEncoder` is that stack on top of ``transformers.BertModel``'s ``embeddings`` and
``encoder`` (no pooler), with SDPA attention by default, so parameter names are Hugging Face's
(``embeddings.word_embeddings.weight``, ``encoder.layer.N.attention.self.query.weight``, ...).

Masks: a 2-D ``(B, K)`` padding mask goes through ``transformers.masking_utils.create_bidirectional_mask``
exactly as ``BertModel`` does in transformers 5 (SDPA receives a boolean ``(B, 1, Q, K)`` mask, eager an
additive ``finfo.min`` mask). For every query row with at least one visible key this is numerically
the official additive -10000 (``exp(-10000)`` underflows to 0 in fp32/fp16/bf16 just as ``exp(-inf)``);
rows whose keys are all masked differ, and are never produced by a padding mask with one real token.
A 3-D ``(B, Q, K)`` mask (OSCAR style) is expanded per head the same way.

Weights: ``bert_model_name`` is a LOCAL Hugging Face directory (``config.json`` + weights), loaded with
``from_pretrained(..., local_files_only=True)``; nothing is downloaded. When the directory holds more
layers than ``num_hidden_layers``, the first layers are used (SOHO's release loads bert-base-uncased with
``strict=False`` into a 3-layer model the same way) and the rest is reported as unused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

logger = logging.getLogger(__name__)

# keys that fix tensor shapes/semantics; with a pretrained directory they must agree with its config.json
ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "pad_token_id",
)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def _check_bert_dir(path: str) -> str:
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"bert_model_name={path!r} looks like a URL; give a local Hugging Face model directory")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"BERT directory not found or incomplete: {path} (needs config.json and model.safetensors or "
            "pytorch_model.bin). Save one with `BertModel.from_pretrained('bert-base-uncased').save_pretrained(DIR)` "
            "on a machine with network, then set bert_model_name=DIR"
        )
    return path


def build_bert_config(bert_model_name: str | os.PathLike | None = None, *, attn_implementation: str = "sdpa",
                      **overrides) -> BertConfig:
    """A ``BertConfig`` from a local directory (or BERT-base defaults) with ``overrides`` applied.

    ``None`` overrides are ignored. With a directory, an architecture key (:data:`ARCH_KEYS`) that
    differs from its ``config.json`` is an error (the weights would not fit); depth, dropout and the
    like may be overridden freely.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {attn_implementation!r} not supported; use one of {ATTN_IMPLEMENTATIONS}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if bert_model_name:
        path = _check_bert_dir(bert_model_name)
        config = BertConfig.from_pretrained(path, local_files_only=True)
        clash = {k: (v, getattr(config, k)) for k, v in overrides.items() if k in ARCH_KEYS and getattr(config, k) != v}
        if clash:
            detail = ", ".join(f"{k}={a!r} (directory has {b!r})" for k, (a, b) in clash.items())
            raise ValueError(f"BERT options {detail} contradict {path}/config.json; remove them or pick another directory")
        for k, v in overrides.items():
            setattr(config, k, v)
    else:
        config = BertConfig(**overrides)
    config._attn_implementation = attn_implementation
    return config


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load_local_bert(path: str, config: BertConfig) -> BertModel:
    path = _check_bert_dir(path)
    with _quiet_transformers():
        model, info = BertModel.from_pretrained(
            path,
            config=config,
            add_pooling_layer=False,
            local_files_only=True,
            attn_implementation=config._attn_implementation,
            output_loading_info=True,
        )
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ValueError(
            f"BERT weights in {path} do not fill the encoder: missing {missing[:8]}, mismatched {list(mismatched)[:8]}; "
            "is it a BERT checkpoint with the same hidden size and vocabulary?"
        )
    unexpected = sorted(info.get("unexpected_keys", []))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        total_layers = json.load(f).get("num_hidden_layers")
    logger.info(
        "loaded BERT from %s: %d of %s layers%s",
        path,
        config.num_hidden_layers,
        total_layers,
        f"; unused: {len(unexpected)} tensors (deeper layers, pooler, heads)" if unexpected else "",
    )
    return model


class BertFusionEncoder(nn.Module):
    """BERT embeddings + layer stack over caller-built joint sequences.

    ``embed_text(input_ids, token_type_ids)`` -> ``(B, T, H)`` text embeddings;
    ``forward(embeddings (B, N, H), attention_mask (B, N) | (B, N, N) | None)`` -> last hidden states
    ``(B, N, H)`` (or ``(last, all_hidden_states)`` with ``output_hidden_states=True``).
    """

    def __init__(self, config: BertConfig, *, bert_model_name: str | os.PathLike | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        if config._attn_implementation not in ATTN_IMPLEMENTATIONS:
            config._attn_implementation = "sdpa"
        bert = _load_local_bert(bert_model_name, config) if bert_model_name else BertModel(config, add_pooling_layer=False)
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_options(cls, *, bert_model_name=None, attn_implementation: str = "sdpa",
                     gradient_checkpointing: bool = False, **overrides) -> BertFusionEncoder:
        config = build_bert_config(bert_model_name, attn_implementation=attn_implementation, **overrides)
        return cls(config, bert_model_name=bert_model_name, gradient_checkpointing=gradient_checkpointing)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer in backward (non-reentrant ``torch.utils.checkpoint``)."""
        for layer in self.encoder.layer:
            layer.gradient_checkpointing = bool(enabled)
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def embed_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"text length {input_ids.shape[1]} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "shorten max_seq_length in the text processor"
            )
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def extended_attention_mask(self, attention_mask: torch.Tensor | None, embeddings: torch.Tensor):
        """The per-head mask the attention implementation expects (``None`` = attend everywhere)."""
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask
        if attention_mask.dim() == 2:
            if attention_mask.shape != embeddings.shape[:2]:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match the sequence {tuple(embeddings.shape[:2])}"
                )
            return create_bidirectional_mask(config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask)
        if attention_mask.dim() == 3:
            keep = (attention_mask > 0)[:, None]
            if self.config._attn_implementation == "sdpa":
                return keep
            return torch.zeros(keep.shape, dtype=embeddings.dtype, device=embeddings.device).masked_fill(
                ~keep, torch.finfo(embeddings.dtype).min
            )
        raise ValueError(f"attention_mask must be (B, K), (B, Q, K) or (B, 1, Q, K); got shape {tuple(attention_mask.shape)}")

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                output_hidden_states: bool = False):
        mask = self.extended_attention_mask(attention_mask, embeddings)
        hidden = embeddings
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
            if output_hidden_states:
                all_hidden.append(hidden)
        if output_hidden_states:
            return hidden, tuple(all_hidden)
        return hidden


__all__ = ["ARCH_KEYS", "BertFusionEncoder", "build_bert_config"]
