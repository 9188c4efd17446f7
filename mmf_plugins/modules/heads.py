"""Classifier and masked-LM heads shared by the region-feature models (VinVL/OSCAR+, VL-BERT).

Module layouts, and therefore state-dict key names, follow the official checkpoints so a converter
renames nothing below the head's own prefix:

* ``linear``  — ``nn.Linear(in, n)``: keys ``weight``, ``bias`` (Oscar ``classifier='linear'``).
* ``mlp``     — ``Sequential(Linear(in, h), ReLU, Linear(h, n))``: keys ``0.*``, ``2.*``
  (Oscar ``classifier='mlp'``, ``h = hidden_size * cls_hidden_scale``).
* ``mlp`` with ``layer_norm_eps`` — ``Sequential(Linear, ReLU, LayerNorm(h), Linear)``: keys ``0.*``,
  ``2.*`` (LayerNorm), ``3.*``: Oscar ``ImageBertForMultipleChoice`` (NLVR2) when the checkpoint's
  config has ``use_img_layernorm``.
* ``mmf_mlp`` — MMF's transformer-head MLP (``mmf/models/transformers/heads/mlp.py`` without its pooler):
  ``num_layers`` x [Dropout, Linear(in, h) + GELU + LayerNorm(h, eps 1e-6)] then Linear(h, n); keys
  ``1.dense.*``, ``1.LayerNorm.*``, ..., ``<2L>.*``. Lets MMF-trained VinVL heads load unchanged.
* :class:`LMPredictionHead` — BERT's masked-LM head: ``transform.dense``, ``transform.LayerNorm``,
  ``decoder`` (no bias; its weight is usually tied to the word embeddings) and a separate ``bias``
  (pytorch-transformers 1.x layout used by Oscar; HF >= 4 also stores ``decoder.bias``, which
  converters fold into ``bias``).

Deliberate difference: none in the math; the LM head can be evaluated on the masked positions only
(see ``LMPredictionHead.forward``), which is what the models here do to save the (tokens x vocab) matmul.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

CLASSIFIER_KINDS = ("linear", "mlp", "mmf_mlp")


class PredictionTransform(nn.Module):
    """Linear -> activation -> LayerNorm (BERT ``BertPredictionHeadTransform`` with its own in-dim)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.transform_act_fn = ACT2FN[hidden_act]
        self.LayerNorm = nn.LayerNorm(out_dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


def linear_classifier(in_dim: int, num_labels: int) -> nn.Linear:
    return nn.Linear(in_dim, num_labels)


def mlp_classifier(in_dim: int, hidden_dim: int, num_labels: int, *, layer_norm_eps: float | None = None) -> nn.Sequential:
    """Oscar's MLP classifier; ``layer_norm_eps`` adds the LayerNorm of the NLVR2 variant after the ReLU."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
    if layer_norm_eps is not None:
        layers.append(nn.LayerNorm(hidden_dim, eps=layer_norm_eps))
    layers.append(nn.Linear(hidden_dim, num_labels))
    return nn.Sequential(*layers)


def mmf_mlp_classifier(
    in_dim: int,
    hidden_dim: int,
    num_labels: int,
    *,
    num_layers: int = 1,
    dropout: float = 0.1,
    layer_norm_eps: float = 1e-6,
    hidden_act: str = "gelu",
) -> nn.Sequential:
    """MMF's ``mlp`` transformer head body (its pooler is the encoder's pooler here)."""
    if num_layers < 0:
        raise ValueError(f"mmf_mlp num_layers must be >= 0, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers):
        layers.append(nn.Dropout(dropout))
        layers.append(PredictionTransform(dim, hidden_dim, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps))
        dim = hidden_dim
    layers.append(nn.Linear(dim, num_labels))
    return nn.Sequential(*layers)


def build_classifier(
    kind: str,
    in_dim: int,
    num_labels: int,
    *,
    hidden_dim: int,
    layer_norm_eps: float | None = None,
    num_layers: int = 1,
    dropout: float = 0.1,
) -> nn.Module:
    """Build a classifier by name (``linear`` | ``mlp`` | ``mmf_mlp``); see the module docstring."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if kind == "linear":
        return linear_classifier(in_dim, num_labels)
    if kind == "mlp":
        return mlp_classifier(in_dim, hidden_dim, num_labels, layer_norm_eps=layer_norm_eps)
    if kind == "mmf_mlp":
        return mmf_mlp_classifier(
            in_dim, hidden_dim, num_labels, num_layers=num_layers, dropout=dropout,
            layer_norm_eps=1e-6 if layer_norm_eps is None else layer_norm_eps,
        )
    raise ValueError(f"unknown classifier '{kind}'; expected one of {', '.join(CLASSIFIER_KINDS)}")


class LMPredictionHead(nn.Module):
    """BERT masked-LM head: transform, then ``decoder`` (tied or not) plus a per-token ``bias``.

    ``forward(hidden)``: ``(..., H) -> (..., vocab)``. Pass only the hidden states of the masked
    positions to skip the full ``(B*T, vocab)`` product.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, hidden_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def tie_to(self, embedding: nn.Embedding) -> None:
        """Share the decoder weight with ``embedding`` (same Parameter; both keys stay in the state dict)."""
        if embedding.weight.shape != self.decoder.weight.shape:
            raise ValueError(
                f"cannot tie LM decoder {tuple(self.decoder.weight.shape)} to embedding {tuple(embedding.weight.shape)}"
            )
        self.decoder.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias
