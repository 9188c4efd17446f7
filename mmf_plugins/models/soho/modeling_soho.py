"""SOHO: end-to-end vision-language model on CNN grid features with a visual dictionary.

Paper: Huang, Zeng, Huang, Liu, Fu, Fu, "Seeing Out of tHe bOx: End-to-End Pre-training for
Vision-Language Representation Learning", CVPR 2021 (arXiv 2104.03135).
Code followed: researchmm/soho @95824a8 (Apache-2.0): ``SOHO/models/models/soho_singleStream_{Pre,VQA}.py``,
``SOHO/models/necks/necks.py`` (``SimpleVDforPreGate`` / ``SimpleVDforPre`` / ``SimpleVDforVQA``),
``SOHO/models/heads/{soho_pre_head,soho_downstream_vqa_head}.py``, ``configs/{Pretrain,VQA}/soho_res18_*.py``.
No code is copied; the forward pass is re-written on torchvision ResNets and transformers' BERT.

Pipeline (read top to bottom: config -> blocks -> model -> heads)::

    image (B,3,H,W) -> GridBackbone C5 -> [2x2 max-pool -> 1x1 conv + BN]        (neck.conv)
        -> visual dictionary (pretraining): nearest entry, EMA update, straight-through
           -> pos_line -> gate with the conv features -> MVM [MASK] (neck.mask_emb)
        -> + 2-D sine position encoding -> LayerNorm                            (neck.ln)
    text: BERT embeddings(input_ids, segment_ids)  ‖  visual tokens  -> BERT layers (bert.*)
    heads on the joint sequence: pretraining (MLM tied to word embeddings, MVM, ITM), vqa,
    retrieval (ITM score), nlvr2 (two image passes), snli_ve.

Where the paper and the released code differ, the default is the code and the paper's choice is an
option (``configs/models/soho/defaults.yaml`` says the same next to each key):

=============================  ==================================  =====================================
topic                          release (default)                   paper (option)
=============================  ==================================  =====================================
size                           ResNet-18 + 3 BERT layers            ResNet-101 + 12 layers (§4.1)
neck order                     max-pool, then 1x1 conv + BN         1x1 conv, then max-pool (§3.1)
                               (``pool_before_proj: true``)         (``false``)
VD momentum                    decay 0.4 (``max_decay`` unused)     γ not given (§3.2)
VD update                      EMA of counts and sums + Laplace     Eq. 4 on used entries
                               (``update_rule: release``)           (``paper``)
MVM masking                    one random location shared by the    per sample, one existing id, all its
                               batch, per-pair Bernoulli(0.015)     features (§3.3)
                               (``mvm_location: shared``)           (``per_sample``, ``mvm_mask_prob: 1``)
MLM / MVM on mismatched pairs  yes (``mlm_on_negatives: true``)     positives only (§4.1) (``false``)
backbone warm-up freeze        none (``freeze_backbone_epochs: 0``) first 10 epochs (§3.2) (``10``)
backbone SGD                   lr 100 × 1e-4, wd 1e-4, m 0.9        lr 1e-2, wd 5e-4 (§4.1)
downstream visual tokens       no VD (``SimpleVDforVQA``)           same (§4.2)
VQA answers                    3129                                 "3,192" (no such vocabulary exists)
=============================  ==================================  =====================================

NOTE(parity) quirks kept by default: the valid-area mask of the visual grid is built from a SQUARE of
side = padded image height and nearest-resized to the grid (``visual_mask_mode: release``;
``exact`` resizes the real pixel mask instead); the VD statistics include padded positions
(``exclude_padding: false``); the VQA loss is ``BCEWithLogits(mean) × num_answers``.

Deliberate differences: MLM logits are computed only at masked positions (the release scores every
position against the 30522-word vocabulary); MVM masking happens only with the ``pretraining``
head; images smaller than ``backbone.min_image_size`` (64 px, one grid cell) are
zero-padded (masked out) instead of crashing the 2x2 pool; the retrieval, NLVR2 and SNLI-VE heads were
never released and follow the paper's description (§4.2: ITM on [CLS]; UNITER-style classifier on
the two [CLS] of NLVR2; one linear layer for SNLI-VE). ITM negatives are made by the dataset (release:
each caption replaced with probability 0.5; paper: two matched and two mismatched captions per image).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch import nn

from mmf_plugins.common.registry import registry
from mmf_plugins.models.base_model import BaseModel
from mmf_plugins.models.soho.visual_dictionary import UPDATE_RULES, VisualDictionary
from mmf_plugins.modules.bert_encoder import BertFusionEncoder
from mmf_plugins.modules.grid_backbones import GridBackbone, build_norm

logger = logging.getLogger(__name__)

HEAD_TYPES = ("pretraining", "vqa", "retrieval", "nlvr2", "snli_ve")
DEFAULT_NUM_LABELS = {"nlvr2": 2, "snli_ve": 3}
IGNORE = -100  # label value of positions without an MVM target (the release's value)


# =====================================================================================  config
@dataclass
class SohoBackboneConfig:
    arch: str = "resnet18"
    pretrained: str | None = None
    frozen_stages: int = 1
    norm_mode: str = "train"
    channels_last: bool = False
    checkpoint_stages: list[str] = field(default_factory=list)
    num_stages: int = 4  # 4: up to C5 (release); 2-3 stop at C3/C4 for a finer grid on small images
    min_image_size: int = 64


@dataclass
class SohoVisualEmbeddingConfig:
    pool_before_proj: bool = True
    norm_mode: str = "sync"
    layer_norm_eps: float = 1e-5
    use_visual_dictionary: bool | None = None  # None: only with the pretraining head
    num_embeddings: int = 2048
    decay: float = 0.4
    eps: float = 1e-5
    update_rule: str = "release"
    gate: bool = True
    pos_align: bool = True
    exclude_padding: bool = False
    mvm_mask_prob: float = 0.015
    mvm_location: str = "shared"
    visual_mask_mode: str = "release"


@dataclass
class SohoBertConfig:
    bert_model_name: str | None = None
    num_hidden_layers: int = 3
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    type_vocab_size: int | None = None
    layer_norm_eps: float | None = None
    hidden_act: str | None = None


@dataclass
class SohoParamGroupConfig:
    optimizer: str = "adamw"
    lr_mult: float = 1.0
    weight_decay: float = 0.01
    momentum: float | None = None
    betas: list[float] | None = None
    eps: float | None = None


@dataclass
class SohoOptimizerGroupsConfig:
    base_lr: float | None = None  # None: the run's optimizer.params.lr
    backbone: SohoParamGroupConfig = field(
        default_factory=lambda: SohoParamGroupConfig(optimizer="sgd", lr_mult=100.0, weight_decay=1e-4, momentum=0.9)
    )
    default: SohoParamGroupConfig = field(
        default_factory=lambda: SohoParamGroupConfig(optimizer="adamw", lr_mult=1.0, weight_decay=0.01,
                                                     betas=[0.9, 0.999], eps=1e-6)
    )


@dataclass
class SohoConfig:
    model: str = "soho"
    training_head_type: str = "pretraining"
    backbone: SohoBackboneConfig = field(default_factory=SohoBackboneConfig)
    visual_embedding: SohoVisualEmbeddingConfig = field(default_factory=SohoVisualEmbeddingConfig)
    bert: SohoBertConfig = field(default_factory=SohoBertConfig)
    freeze_backbone_epochs: int = 0
    mlm_on_negatives: bool = True
    num_answers: int = 3129
    vqa_head_dropout: float = 0.5
    vqa_loss_times_num_answers: bool = True
    num_labels: int | None = None  # None: 2 for nlvr2, 3 for snli_ve
    optimizer_groups: SohoOptimizerGroupsConfig = field(default_factory=SohoOptimizerGroupsConfig)
    losses: list[Any] = field(default_factory=list)  # MMF compatibility; SOHO computes its own losses


def resolve_soho_config(config: DictConfig | dict | None) -> DictConfig:
    """Merge a user ``model_config.soho`` onto :class:`SohoConfig`; unknown keys and wrong types raise."""
    schema = OmegaConf.structured(SohoConfig)
    try:
        merged = OmegaConf.merge(schema, config or {})
    except (ConfigKeyError, ValidationError) as e:
        raise ValueError(
            f"invalid model_config.soho: {e.__class__.__name__}: {str(e).splitlines()[0]}; "
            "see configs/models/soho/defaults.yaml for the options"
        ) from e
    if merged.training_head_type not in HEAD_TYPES:
        raise ValueError(f"training_head_type {merged.training_head_type!r} unknown; expected one of {', '.join(HEAD_TYPES)}")
    ve = merged.visual_embedding
    if ve.update_rule not in UPDATE_RULES:
        raise ValueError(f"visual_embedding.update_rule {ve.update_rule!r} unknown; expected one of {UPDATE_RULES}")
    if ve.mvm_location not in ("shared", "per_sample"):
        raise ValueError(f"visual_embedding.mvm_location {ve.mvm_location!r} unknown; expected 'shared' or 'per_sample'")
    if ve.visual_mask_mode not in ("release", "exact"):
        raise ValueError(f"visual_embedding.visual_mask_mode {ve.visual_mask_mode!r} unknown; expected 'release' or 'exact'")
    if not 0.0 <= ve.mvm_mask_prob <= 1.0:
        raise ValueError(f"visual_embedding.mvm_mask_prob must be in [0, 1], got {ve.mvm_mask_prob}")
    return merged


# =====================================================================================  blocks
class ConvBN(nn.Module):
    """1x1 convolution without bias followed by a norm layer, no activation (mmcv ``ConvModule`` with
    ``norm_cfg`` and ``activation=None``; keys ``conv.weight``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, norm_mode: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = build_norm(out_channels, norm_mode)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def shared_image_rows(image_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, inverse)`` such that ``x[first][inverse]`` repeats one row per image id, or None when
    every row has its own image (or ids are missing)."""
    if image_ids is None or image_ids.dim() != 1 or image_ids.numel() < 2:
        return None
    unique, inverse = torch.unique(image_ids, return_inverse=True)
    if unique.numel() == image_ids.numel():
        return None
    first = torch.full((unique.numel(),), image_ids.numel(), dtype=torch.long, device=image_ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(image_ids.numel(), device=image_ids.device), reduce="amin")
    return first, inverse


def sine_position_encoding(valid: torch.Tensor, dim: int) -> torch.Tensor:
    """DETR-style 2-D sine encoding of a valid-area mask ``(B, h, w)`` -> ``(B, dim, h, w)`` fp32.

    Cumulative sums over rows/columns normalised to (0, 2π]; ``dim/2`` channels for y then ``dim/2``
    for x, sin/cos interleaved, wavelengths ``10000^(2⌊i/2⌋/(dim/2))`` (necks.py ``position_encoding_sine``).
    """
    if dim % 4:
        raise ValueError(f"sine position encoding needs a hidden size divisible by 4, got {dim}")
    valid = valid.float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=valid.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def _nearest_source_index(out_size: int, in_size: int, device) -> torch.Tensor:
    """Source index of ``F.interpolate(mode="nearest")`` for each output index (fp32 arithmetic as torch)."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    idx = (torch.arange(out_size, dtype=torch.float32) * scale).floor().long().clamp(max=in_size - 1)
    return idx.to(device)


def grid_valid_mask(image_mask: torch.Tensor, grid_hw: tuple[int, int], mode: str = "release") -> torch.Tensor:
    """Valid visual tokens ``(B, h, w)`` bool from the pixel mask ``(B, H, W)`` (True = real image).

    ``exact``: nearest-resize of the pixel mask to the grid. ``release`` (NOTE(parity)): the release
    (``get_vis_mask``) fills a SQUARE of side = padded height with ones over ``[:img_h, :img_w]`` and
    nearest-resizes it to the grid, so the width is scaled by the height; computed here from the
    valid extents without building the square.
    """
    h, w = grid_hw
    if mode == "exact":
        return F.interpolate(image_mask[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
    side = image_mask.shape[1]
    img_h = image_mask.any(dim=2).sum(dim=1)
    img_w = image_mask.any(dim=1).sum(dim=1)
    rows = _nearest_source_index(h, side, image_mask.device)
    cols = _nearest_source_index(w, side, image_mask.device)
    return (rows[None, :, None] < img_h[:, None, None]) & (cols[None, None, :] < img_w[:, None, None])


def sample_mvm_mask(ids: torch.Tensor, valid: torch.Tensor, mask_prob: float, location: str = "shared") -> torch.Tensor:
    """Which visual tokens MVM replaces by ``[MASK]``: ``(B, h, w)`` bool.

    ``shared`` (release): one random grid location for the whole batch; in each sample every valid
    position whose VD id equals the id at that location is masked, for a sample drawn with
    probability ``mask_prob`` (an invalid location masks nothing). ``per_sample`` (paper): the
    location is drawn among each sample's valid positions.
    """
    b, h, w = ids.shape
    flat_ids = ids.reshape(b, -1)
    flat_valid = valid.reshape(b, -1)
    if location == "shared":
        loc = torch.randint(h * w, (1,), device=ids.device).expand(b)
    else:
        weights = flat_valid.float() + (~flat_valid.any(1, keepdim=True)).float()  # rows without valid: uniform
        loc = torch.multinomial(weights, 1).squeeze(1)
    chosen = flat_ids.gather(1, loc[:, None])
    chosen_valid = flat_valid.gather(1, loc[:, None])
    same = (flat_ids == chosen) & flat_valid & chosen_valid
    draw = torch.rand(b, 1, device=ids.device) < mask_prob
    return (same & draw).reshape(b, h, w)


class SohoVisualEmbedding(nn.Module):
    """The release's neck: grid features -> visual tokens ``(B, h·w, H)`` for the fusion encoder.

    With ``use_visual_dictionary`` (pretraining; ``SimpleVDforPreGate`` / ``SimpleVDforPre``) the
    projected features are quantised by the VD, passed through ``pos_line`` and mixed with the
    unquantised features by a 2-way softmax gate (or added, ``gate: false``); MVM then swaps selected
    tokens for ``mask_emb``. Without it (downstream; ``SimpleVDforVQA``) the projected features are used
    directly. Every variant adds the sine position encoding and applies LayerNorm.

    ``forward(c5, image_mask, mask_visual)`` returns ``tokens (B, N, H)``, ``visual_mask (B, N)`` long,
    ``grid_hw``, and with the VD ``vd_ids (B, N)`` (+ ``mvm_labels (B, N)``, −100 = no target, when
    ``mask_visual``).
    """

    def __init__(self, in_channels: int, hidden_size: int, *, pool_before_proj: bool = True, norm_mode: str = "sync",
                 layer_norm_eps: float = 1e-5, use_visual_dictionary: bool = True, num_embeddings: int = 2048,
                 decay: float = 0.4, eps: float = 1e-5, update_rule: str = "release", gate: bool = True,
                 pos_align: bool = True, exclude_padding: bool = False, mvm_mask_prob: float = 0.015,
                 mvm_location: str = "shared", visual_mask_mode: str = "release"):
        super().__init__()
        if hidden_size % 4:
            raise ValueError(f"hidden size must be divisible by 4 for the sine position encoding, got {hidden_size}")
        self.hidden_size = hidden_size
        self.pool_before_proj = pool_before_proj
        self.use_visual_dictionary = use_visual_dictionary
        self.gate = gate and use_visual_dictionary
        self.pos_align = pos_align and use_visual_dictionary
        self.exclude_padding = exclude_padding
        self.mvm_mask_prob = mvm_mask_prob
        self.mvm_location = mvm_location
        self.visual_mask_mode = visual_mask_mode

        self.conv = ConvBN(in_channels, hidden_size, norm_mode)
        self.ln = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        if use_visual_dictionary:
            self.mask_emb = nn.Embedding(1, hidden_size)
            self.vq = VisualDictionary(num_embeddings, hidden_size, decay=decay, eps=eps, update_rule=update_rule)
            if self.pos_align:
                self.pos_line = nn.Linear(hidden_size, hidden_size)
            if self.gate:
                self.gate_fc = ConvBN(2 * hidden_size, 2, norm_mode)

    def project(self, c5: torch.Tensor) -> torch.Tensor:
        """C5 ``(B, C, h', w')`` -> projected grid ``(B, H, h'/2, w'/2)``."""
        if c5.shape[-2] < 2 or c5.shape[-1] < 2:
            raise ValueError(
                f"backbone grid {tuple(c5.shape[-2:])} is smaller than the 2x2 pool; images need at least "
                "backbone.stride + 1 pixels per side (raise backbone.min_image_size)"
            )
        if self.pool_before_proj:
            return self.conv(F.max_pool2d(c5, 2, stride=2))
        return F.max_pool2d(self.conv(c5), 2, stride=2)

    def forward(self, c5: torch.Tensor, image_mask: torch.Tensor, mask_visual: bool = False) -> dict:
        x = self.project(c5)
        b, hidden, h, w = x.shape
        valid = grid_valid_mask(image_mask, (h, w), self.visual_mask_mode)
        out: dict[str, Any] = {"grid_hw": (h, w), "visual_mask": valid.reshape(b, -1).long()}
        v = x
        if self.use_visual_dictionary:
            flat = x.permute(0, 2, 3, 1).reshape(-1, hidden)
            quantized, ids = self.vq(flat, valid.reshape(-1) if self.exclude_padding else None)
            if self.pos_align:
                quantized = self.pos_line(quantized)
            quantized = quantized.reshape(b, h, w, hidden).permute(0, 3, 1, 2)
            if self.gate:
                weights = F.softmax(self.gate_fc(torch.cat([quantized, x], dim=1)), dim=1)
                v = quantized * weights[:, 0:1] + x * weights[:, 1:2]
            else:
                v = quantized + x
            ids = ids.reshape(b, h, w)
            out["vd_ids"] = ids.reshape(b, -1)
            if mask_visual:
                masked = sample_mvm_mask(ids, valid, self.mvm_mask_prob, self.mvm_location)
                mask_token = self.mask_emb.weight.reshape(1, hidden, 1, 1).to(v.dtype)
                v = torch.where(masked[:, None], mask_token, v)  # keeps mask_emb in the graph (DDP)
                out["mvm_labels"] = torch.where(masked, ids, torch.full_like(ids, IGNORE)).reshape(b, -1)
        v = v + sine_position_encoding(valid, hidden).to(v.dtype)
        out["tokens"] = self.ln(v.flatten(2).transpose(1, 2))
        return out


# =====================================================================================  model
@dataclass
class HeadContext:
    """What heads may read besides the encoder output: the tied MLM decoder weight, the VD, loss keys."""

    word_embeddings: torch.Tensor
    dictionary: VisualDictionary | None
    loss_key: Any  # callable name -> "{dataset_type}/{dataset_name}/{name}"


TEXT_FIELDS = ("input_ids", "input_mask", "segment_ids", "lm_label_ids", "is_correct")


@registry.register_model("soho")
class SohoModel(BaseModel):
    """SOHO on a ``SampleList``.

    Reads ``image`` (B,3,H,W) normalised, ``image_mask`` (B,H,W) optional, ``input_ids``/``input_mask``/
    ``segment_ids`` (B,T) — or (B,K,T) for K captions per image (the release's ``sentence_group``: the
    backbone runs once per image) —, and per head ``lm_label_ids`` (−1 = not masked), ``is_correct``
    (ITM, 1 = matched), ``targets`` (VQA soft scores (B, A); NLVR2/SNLI-VE class ids (B,) or soft (B, C)),
    ``image_1``/``image_1_mask`` (NLVR2 second image).
    Returns ``{"scores", "losses": {key: scalar}}`` plus ``visual_mask``, ``grid_hw`` and, with the VD,
    ``vd_ids``/``mvm_labels``; the pretraining/retrieval heads add ``itm_logits``.
    """

    def __init__(self, config: DictConfig | dict | None = None):
        super().__init__(config)
        self.options = resolve_soho_config(self.config)

    @classmethod
    def config_path(cls) -> str:
        return "configs/models/soho/defaults.yaml"

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        o = self.options
        self.training_head_type = o.training_head_type
        bb = OmegaConf.to_container(o.backbone, resolve=True)
        self.min_image_size = int(bb.pop("min_image_size"))
        self.backbone = GridBackbone.from_config(bb)
        if self.min_image_size < self.backbone.stride + 1:
            raise ValueError(
                f"backbone.min_image_size={self.min_image_size} is too small: the 2x2 pool after a stride-"
                f"{self.backbone.stride} backbone needs at least {self.backbone.stride + 1} pixels per side"
            )
        bert = OmegaConf.to_container(o.bert, resolve=True)
        self.bert = BertFusionEncoder.from_options(**bert)
        hidden = self.bert.hidden_size

        ve = OmegaConf.to_container(o.visual_embedding, resolve=True)
        if ve["use_visual_dictionary"] is None:
            ve["use_visual_dictionary"] = self.training_head_type == "pretraining"
        self.neck = SohoVisualEmbedding(self.backbone.out_channels, hidden, **ve)

        head = self.training_head_type
        num_labels = o.num_labels if o.num_labels is not None else DEFAULT_NUM_LABELS.get(head)
        if head == "pretraining":
            if not self.neck.use_visual_dictionary:
                raise ValueError("the pretraining head needs the visual dictionary (MVM); set "
                                 "visual_embedding.use_visual_dictionary to true or null")
            self.head = SohoPretrainingHead(hidden, mlm_on_negatives=o.mlm_on_negatives)
        elif head == "vqa":
            self.head = SohoVQAHead(hidden, o.num_answers, dropout=o.vqa_head_dropout,
                                    loss_times_num_answers=o.vqa_loss_times_num_answers)
        elif head == "retrieval":
            self.head = SohoRetrievalHead(hidden)
        elif head == "nlvr2":
            self.head = SohoNLVR2Head(hidden, num_labels)
        else:
            self.head = SohoClassificationHead(hidden, num_labels)
        if o.freeze_backbone_epochs > 0:
            self.set_backbone_trainable(False)

    # ------------------------------------------------------------------ backbone schedule
    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or release the whole visual backbone (``frozen_stages`` stay frozen). The paper freezes
        it for the first 10 epochs while the VD warms up; the trainer calls this at epoch starts (or
        :meth:`on_train_epoch_start`). While frozen the trunk runs without a graph and its BatchNorms in
        eval mode; ``requires_grad`` is left on, so under DDP those epochs need
        ``find_unused_parameters=True`` (see ``GridBackbone.set_trainable``)."""
        self.backbone.set_trainable(trainable)
        logger.info("SOHO backbone %s", "trainable" if trainable else "frozen")

    def backbone_trainable_at_epoch(self, epoch: int) -> bool:
        return epoch >= self.options.freeze_backbone_epochs

    def on_train_epoch_start(self, epoch: int) -> None:
        """Apply ``freeze_backbone_epochs`` for a 0-based epoch index."""
        trainable = self.backbone_trainable_at_epoch(epoch)
        if trainable != self.backbone.is_trainable:
            self.set_backbone_trainable(trainable)

    # ------------------------------------------------------------------ optimizer
    def get_optimizer_parameters(self, config) -> list[dict]:
        """Two groups as the release's ``AdamwSGD``: the backbone (outside ``frozen_stages``) with SGD at
        ``lr_mult × base_lr`` (100 × 1e-4), momentum 0.9, wd 1e-4; everything else with AdamW at base_lr
        1e-4, wd 0.01, eps 1e-6 (weight decay on every tensor, as the release). Each group carries
        ``"optimizer"`` so the trainer steps it with the named optimizer. ``base_lr`` comes from
        ``optimizer_groups.base_lr``, else the run's ``optimizer.params.lr``."""
        og = self.options.optimizer_groups
        base_lr = og.base_lr
        if base_lr is None and config is not None:
            cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
            base_lr = OmegaConf.select(cfg, "optimizer.params.lr", default=None)
        if base_lr is None:
            base_lr = 1e-4
            logger.info("SOHO optimizer groups: no optimizer.params.lr given; using the release's base lr 1e-4")
        backbone = list(self.backbone.trainable_parameters())
        in_backbone = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if id(p) not in in_backbone and p.requires_grad]
        groups = []
        for name, params, spec in (("backbone", backbone, og.backbone), ("default", rest, og.default)):
            if not params:
                continue
            group = {"name": name, "params": params, "lr": float(base_lr) * spec.lr_mult,
                     "weight_decay": spec.weight_decay, "optimizer": spec.optimizer}
            if spec.momentum is not None:
                group["momentum"] = spec.momentum
            if spec.betas is not None:
                group["betas"] = tuple(spec.betas)
            if spec.eps is not None:
                group["eps"] = spec.eps
            groups.append(group)
        return groups

    # ------------------------------------------------------------------ forward
    def _prepare_images(self, image: torch.Tensor, image_mask: torch.Tensor | None):
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"SOHO expects 'image' as a float tensor (B, 3, H, W), got {shape}; use an image processor")
        b, _, h, w = image.shape
        if image_mask is None:
            image_mask = torch.ones(b, h, w, dtype=torch.bool, device=image.device)
        elif tuple(image_mask.shape) != (b, h, w):
            raise ValueError(f"image_mask {tuple(image_mask.shape)} does not match image {tuple(image.shape)}; expected (B, H, W)")
        image_mask = image_mask.bool()
        m = self.min_image_size
        if h < m or w < m:
            pad_h, pad_w = max(0, m - h), max(0, m - w)
            if not getattr(self, "_warned_small_images", False):
                logger.warning("images of %dx%d px are zero-padded to the minimum %d px (padding masked out); "
                               "resize them larger for useful visual tokens", h, w, m)
                self._warned_small_images = True
            image = F.pad(image, (0, pad_w, 0, pad_h))
            image_mask = F.pad(image_mask, (0, pad_w, 0, pad_h), value=False)
        return image, image_mask

    def encode(self, image: torch.Tensor, image_mask: torch.Tensor | None, input_ids: torch.Tensor,
               input_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None, *,
               captions_per_image: int = 1, mask_visual: bool = False, image_ids: torch.Tensor | None = None) -> dict:
        """Backbone + neck + fusion. Text is ``(B·K, T)`` for ``B`` images and ``K`` captions each.
        Returns the neck's outputs plus ``hidden (B·K, T+N, H)`` and ``text_len``.

        In eval mode, rows with the same ``image_ids`` (B,) share one backbone pass (eval transforms are
        deterministic and BN uses running statistics, so the result is the same as one pass per row)."""
        image, image_mask = self._prepare_images(image, image_mask)
        rows = shared_image_rows(image_ids) if captions_per_image == 1 and not self.training else None
        if rows is not None and not torch.equal(image[rows[0]][rows[1]], image):
            rows = None  # same id, different pixels (ids not unique in this dataset): no sharing
        if rows is not None:  # eval: several questions of one image in the batch -> one backbone pass
            first, inverse = rows
            c5 = self.backbone(image[first])[inverse]
        else:
            c5 = self.backbone(image)
        if captions_per_image > 1:
            c5 = c5.repeat_interleave(captions_per_image, dim=0)
            image_mask = image_mask.repeat_interleave(captions_per_image, dim=0)
        if c5.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{c5.shape[0]} image rows but {input_ids.shape[0]} texts; batch sizes must match")
        visual = self.neck(c5, image_mask, mask_visual=mask_visual)
        if input_mask is None:
            input_mask = torch.ones_like(input_ids)
        text = self.bert.embed_text(input_ids, segment_ids)
        tokens = visual["tokens"].to(text.dtype)
        sequence = torch.cat([text, tokens], dim=1)
        mask = torch.cat([input_mask.to(visual["visual_mask"].dtype), visual["visual_mask"]], dim=1)
        visual["hidden"] = self.bert(sequence, mask)
        visual["text_len"] = input_ids.shape[1]
        return visual

    def _text_fields(self, sample_list) -> tuple[dict, int]:
        """Text-side fields, flattened from (B, K, ...) to (B·K, ...) when K captions per image."""
        if "input_ids" not in sample_list:
            raise KeyError("SOHO needs 'input_ids' in the batch (a text processor produces it)")
        input_ids = sample_list["input_ids"]
        k = input_ids.shape[1] if input_ids.dim() == 3 else 1
        fields = {}
        for name in TEXT_FIELDS:
            value = sample_list.get(name)
            if isinstance(value, torch.Tensor) and k > 1:
                value = value.flatten(0, 1)
            fields[name] = value
        return fields, k

    def forward(self, sample_list) -> dict:
        if "image" not in sample_list:
            raise KeyError("SOHO needs 'image' (B, 3, H, W) in the batch; configure an image database/processor")
        text, k = self._text_fields(sample_list)
        image, image_mask = sample_list["image"], sample_list.get("image_mask")
        if self.training_head_type == "nlvr2":
            if k > 1:
                raise ValueError("the nlvr2 head takes one statement per image pair; got input_ids (B, K, T)")
            image, image_mask, text = self._pair_images(sample_list, text)
        image_ids = sample_list.get("image_id") if self.training_head_type != "nlvr2" else None
        encoded = self.encode(image, image_mask, text["input_ids"], text["input_mask"], text["segment_ids"],
                              captions_per_image=k, mask_visual=self.training_head_type == "pretraining",
                              image_ids=image_ids if isinstance(image_ids, torch.Tensor) else None)
        context = HeadContext(
            word_embeddings=self.bert.word_embeddings.weight,
            dictionary=self.neck.vq if self.neck.use_visual_dictionary else None,
            loss_key=lambda name: self.loss_key(sample_list, name),
        )
        targets = {"lm_label_ids": text["lm_label_ids"], "is_correct": text["is_correct"],
                   "targets": sample_list.get("targets")}
        output = self.head(encoded, targets, context)
        for key in ("visual_mask", "grid_hw", "vd_ids", "mvm_labels"):
            if key in encoded:
                output[key] = encoded[key]
        return output

    def _pair_images(self, sample_list, text: dict):
        """NLVR2: stack ``image`` and ``image_1`` (padded to one size) as 2B rows; repeat the text."""
        if "image_1" not in sample_list:
            raise KeyError("the nlvr2 head needs 'image_1' (and optionally 'image_1_mask') beside 'image'")
        a, am = self._prepare_images(sample_list["image"], sample_list.get("image_mask"))
        b, bm = self._prepare_images(sample_list["image_1"], sample_list.get("image_1_mask"))
        h, w = max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1])

        def pad(img, msk):
            ph, pw = h - img.shape[-2], w - img.shape[-1]
            return F.pad(img, (0, pw, 0, ph)), F.pad(msk, (0, pw, 0, ph), value=False)

        (a, am), (b, bm) = pad(a, am), pad(b, bm)
        doubled = {k: (torch.cat([v, v], dim=0) if isinstance(v, torch.Tensor) else v) for k, v in text.items()}
        return torch.cat([a, b], dim=0), torch.cat([am, bm], dim=0), doubled

    def format_state_key(self, key: str) -> str:
        from mmf_plugins.models.soho.convert_soho import rename_official_key

        return rename_official_key(key) or key


# =====================================================================================  heads
def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ CE / (#targets + 1e-6), as the release (0, not NaN, when nothing is masked)."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss / (labels.numel() + 1e-6)


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with class ids ``(B,)`` or soft/one-hot targets ``(B, C)``."""
    if targets.dim() == 1 or (targets.dim() == 2 and targets.shape[1] == 1):
        return F.cross_entropy(logits.float(), targets.reshape(-1).long())
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} fit neither class ids (B,) nor scores {tuple(logits.shape)}")
    return F.cross_entropy(logits.float(), targets.float())


class SohoPretrainingHead(nn.Module):
    """MLM (decoder tied to the word embeddings, no transform, no bias: the release's ``mask_l_fc``),
    MVM (cosine similarity of visual outputs to the VD entries), ITM (``match_class``, no bias, on [CLS]).
    Losses: ``mlm`` and ``mvm`` = Σ CE / (#targets + 1e-6); ``itm`` = mean CE; each only when its labels
    exist (MVM labels come from the model itself)."""

    def __init__(self, hidden_size: int, *, mlm_on_negatives: bool = True):
        super().__init__()
        self.mlm_on_negatives = mlm_on_negatives
        self.match_class = nn.Linear(hidden_size, 2, bias=False)
        nn.init.kaiming_normal_(self.match_class.weight)

    def forward(self, encoded: dict, targets: dict, context: HeadContext) -> dict:
        hidden, text_len = encoded["hidden"], encoded["text_len"]
        itm_logits = self.match_class(hidden[:, 0])
        output = {"scores": itm_logits, "itm_logits": itm_logits, "losses": {}}
        losses = output["losses"]
        lm_labels, is_correct = targets["lm_label_ids"], targets["is_correct"]
        mvm_labels = encoded.get("mvm_labels")
        if is_correct is not None and not self.mlm_on_negatives:
            negative = is_correct.reshape(-1, 1) == 0
            if lm_labels is not None:
                lm_labels = lm_labels.masked_fill(negative, -1)
            if mvm_labels is not None:
                mvm_labels = mvm_labels.masked_fill(negative, IGNORE)
        if lm_labels is not None:
            selected = lm_labels >= 0
            text_hidden = hidden[:, :text_len][selected]
            logits = F.linear(text_hidden, context.word_embeddings)
            losses[context.loss_key("mlm")] = _masked_cross_entropy(logits, lm_labels[selected])
        if mvm_labels is not None:
            selected = mvm_labels >= 0
            logits = context.dictionary.cosine_logits(hidden[:, text_len:][selected])
            losses[context.loss_key("mvm")] = _masked_cross_entropy(logits, mvm_labels[selected])
        if is_correct is not None:
            losses[context.loss_key("itm")] = F.cross_entropy(itm_logits.float(), is_correct.reshape(-1).long())
        return output


class SohoVQAHead(nn.Module):
    """Linear(H, 4H) -> ReLU -> Dropout(0.5) -> Linear(4H, A) on [CLS] (``head.vqa.{0,3}``); loss
    ``BCEWithLogits(mean) × A`` (the release multiplies by the number of answers)."""

    def __init__(self, hidden_size: int, num_answers: int, *, dropout: float = 0.5, loss_times_num_answers: bool = True):
        super().__init__()
        self.num_answers = num_answers
        self.loss_times_num_answers = loss_times_num_answers
        self.vqa = nn.Sequential(
            nn.Linear(hidden_size, hidden_size * 4), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_size * 4, num_answers)
        )
        for m in self.vqa:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, encoded: dict, targets: dict, context: HeadContext) -> dict:
        scores = self.vqa(encoded["hidden"][:, 0])
        output = {"scores": scores, "losses": {}}
        soft = targets["targets"]
        if soft is not None and soft.dim() == 3:  # (B, K, A): K questions per image, flattened like the text
            soft = soft.flatten(0, 1)
        if soft is not None:
            if tuple(soft.shape) != tuple(scores.shape):
                raise ValueError(f"VQA targets {tuple(soft.shape)} do not match scores {tuple(scores.shape)} "
                                 f"(num_answers={self.num_answers}); check the answer vocabulary size")
            loss = F.binary_cross_entropy_with_logits(scores.float(), soft.float())
            if self.loss_times_num_answers:
                loss = loss * soft.shape[1]
            output["losses"][context.loss_key("logit_bce")] = loss
        return output


class SohoRetrievalHead(nn.Module):
    """Image-text matching on [CLS] (``match_class``, shared with pretraining's ITM). ``scores`` (B,) is
    the match log-odds ``l_match − l_mismatch`` (sigmoid = softmax probability of a match); trained with
    cross-entropy on ``is_correct`` (positives plus sampled negatives)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.match_class = nn.Linear(hidden_size, 2, bias=False)
        nn.init.kaiming_normal_(self.match_class.weight)

    def forward(self, encoded: dict, targets: dict, context: HeadContext) -> dict:
        logits = self.match_class(encoded["hidden"][:, 0])
        output = {"scores": logits[:, 1] - logits[:, 0], "itm_logits": logits, "losses": {}}
        labels = targets["is_correct"] if targets["is_correct"] is not None else targets["targets"]
        if labels is not None:
            output["losses"][context.loss_key("itm")] = F.cross_entropy(logits.float(), labels.reshape(-1).long())
        return output


class SohoNLVR2Head(nn.Module):
    """Two image-text passes; [CLS] of both concatenated (2H) -> Linear -> GELU -> LayerNorm -> Linear
    (UNITER's paired head, which the paper follows; no SOHO code was released)."""

    def __init__(self, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(2 * hidden_size, 2 * hidden_size), nn.GELU(), nn.LayerNorm(2 * hidden_size, eps=1e-12),
            nn.Linear(2 * hidden_size, num_labels),
        )

    def forward(self, encoded: dict, targets: dict, context: HeadContext) -> dict:
        cls = encoded["hidden"][:, 0]
        half = cls.shape[0] // 2
        scores = self.classifier(torch.cat([cls[:half], cls[half:]], dim=1))
        output = {"scores": scores, "losses": {}}
        if targets["targets"] is not None:
            output["losses"][context.loss_key("cross_entropy")] = _classification_loss(scores, targets["targets"])
        return output


class SohoClassificationHead(nn.Module):
    """One linear layer on [CLS] (SNLI-VE, 3 classes; the paper's "fully-connected layer")."""

    def __init__(self, hidden_size: int, num_labels: int = 3):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, encoded: dict, targets: dict, context: HeadContext) -> dict:
        scores = self.classifier(encoded["hidden"][:, 0])
        output = {"scores": scores, "losses": {}}
        if targets["targets"] is not None:
            output["losses"][context.loss_key("cross_entropy")] = _classification_loss(scores, targets["targets"])
        return output


__all__ = [
    "SohoConfig",
    "SohoModel",
    "SohoVisualEmbedding",
    "grid_valid_mask",
    "resolve_soho_config",
    "sample_mvm_mask",
    "sine_position_encoding",
]
