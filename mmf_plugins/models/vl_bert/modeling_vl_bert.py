"""VL-BERT: one BERT over words and regions, every token carrying a visual feature embedding.

Paper: Su, Zhu, Cao, Li, Lu, Wei, Dai, "VL-BERT: Pre-training of Generic Visual-Linguistic Representations",
ICLR 2020 (arXiv 1908.08530). Code followed: jackroos/VL-BERT @4373674 (MIT): ``common/visual_linguistic_bert.py``
(``VisualLinguisticBert.embedding``), ``common/fast_rcnn.py`` (``FastRCNN``), ``common/utils/bbox.py``
(``coordinate_embeddings``), ``pretrain/modules/resnet_vlbert_for_pretraining_multitask.py``,
``{vqa,vcr,refcoco}/modules/resnet_vlbert_for_*.py`` and the ``cfgs/``. No code is copied; the encoder is
transformers' BERT (SDPA attention), the e2e visual path is torchvision (``modules/roi_features.py``).

Read top to bottom: config -> sequence rules (pure functions) -> blocks -> the model -> heads::

    regions: boxes (xyxy px, whole image as box 0) ─┬─ geometry: (xc, yc, w, h)/(W, H)·100 -> sin ‖ cos, 256
             RoI feature (prec: from the sample;    │  frequencies per coordinate (2048)
             e2e: ResNet C4 -> RoIAlign -> C5)     ─┴─ [geometry ‖ feature] -> Dropout -> Linear -> ReLU = obj_rep
    text token t:  word(t) + LN_text(obj_rep[tag(t)])              (tag 0 = whole-image box)
    object i:      object_linguistic_embedding + LN_object(obj_rep[i])
    sequence = [valid text] [valid objects] [END], packed; token type: text as given (0/1), objects+END 2;
               position: text 0..L-1, every object L, [END] L+1 -> + pos + type -> LayerNorm -> Dropout
    -> BERT layers -> text / object / pooled outputs -> head (pretraining | vqa | multiple_choice | refcoco)

Heads (``training_head_type``):

* ``pretraining``: masked LM with visual clues (``mlm``; tied decoder), masked RoI classification against
  the detector's class distribution ``image_info_0.cls_prob`` (``mvrc``, soft cross-entropy), and on
  text-only batches (``text_only`` true, no visual fields) the masked LM with the learned
  ``aux_text_visual_embedding`` as every token's visual embedding and no objects (``mlm_aux``).
  Region masking is done HERE, in the model (not by the ``region_mask`` processor, which must then be
  left out): each real region (never the whole-image box) is chosen with ``mvrc_mask_probability``;
  a chosen region is replaced with ``mvrc_replace_probability`` (prec: its RoI feature becomes
  ``object_mask_visual_embedding``; e2e: its pixels are zeroed before the backbone, the release's
  ``MASK_RAW_PIXELS``), and its linguistic embedding becomes ``object_mask_word_embedding``; the
  whole-image box feature (prec) is recomputed as the mean of the regions not replaced. Whole-word
  masking of the text is the text processor's job (``whole_word_mask: true``).
* ``vqa``: ``[CLS] q [SEP] [MASK] [SEP]`` (the dataset's ``text_b: "[MASK]"``); the hidden state of the
  answer slot (the first segment-1 token; checked to be ``mask_token_id`` when that is set) ->
  ``final_mlp`` = BERT prediction transform -> Dropout -> Linear(H, num_labels); BCE-with-logits x
  num_labels on the soft scores ``targets``. The transform starts from BERT's MLM transform
  (``bert_model_name``) and, with a pretrained VL-BERT checkpoint, from its MLM head (converter option
  ``task: vqa``); ``classifier_pretrained`` sets each answer's weight row to the mean word embedding
  of its tokens (release ``CLASSIFIER_PRETRAINED``), again after a checkpoint fills the embeddings.
* ``multiple_choice`` (VCR): inputs ``input_ids / input_mask / segment_ids / text_tags`` of shape
  ``(B, C, T)`` (``[CLS] q [SEP] a_c [SEP]``, tags pointing words at boxes), regions shared by the C
  candidates (encoded once); pooled [CLS] -> Dropout -> Linear(H, 1) -> ``scores (B, C)``; loss
  ``bce`` (release ``CLASSIFIER_SIGMOID``, one-hot over candidates) or ``ce``; ``targets`` = index of the
  right candidate. More candidates than ``num_choices`` is an error.
* ``refcoco``: every region's output -> MVRC-style transform (dense + GELU) -> Dropout -> Linear(H, 1)
  -> ``scores (B, R)`` (padding -10000); BCE over real regions against ``region_targets`` (1 where the
  region's IoU with the referred box is >= 0.5). ``boxes`` (B, R, 4) are returned for the
  ``refcoco_accuracy`` metric.

Deliberate differences from the release:

* SDPA attention (``attn_implementation: eager`` for the reference kernel); the padding mask is
  boolean, numerically the release's additive -10000 for every real query (see ``bert_encoder.py``).
* Parameter names follow transformers (``vlbert.embeddings.word_embeddings`` for ``vlbert.word_embeddings``,
  ``vlbert.embeddings.LayerNorm`` for ``vlbert.embedding_LayerNorm``, ``mlm_head.*`` for
  ``vlbert.mlm_head.predictions.*``, ``image_feature_extractor.roi_features.*`` for the e2e ResNet);
  ``convert_vl_bert.py`` maps the released keys.
* e2e: the ResNet is torchvision's with frozen BN; its first res2..res4 blocks are re-wired to put the
  stride in the 1x1 conv (``stride_in_1x1``, the release's caffe layout) and every res5 block is
  dilated 2 (torchvision leaves the first one at 1). Boxes come in original-image pixels and are scaled
  to the network input with ``image_info_0.scale`` (or the valid extent of ``image_mask``); the
  geometry embedding uses the original boxes and size (the release uses the resized ones: same ratios
  up to rounding).
* Text longer than ``max_seq_length`` together with the regions is cut in the model by the release's
  rule (``conceptual_captions.py``: drop a region while there are more regions than tokens, else a
  token, keeping the last token; at least 2 tokens and 1 region). ``null`` (default) cuts nothing.
* An image without regions gets the whole-image box alone with a zero feature (the release crashes);
  the MLM losses are 0 (not NaN) on a batch without masked tokens.
* Not implemented (off in every released config): ``visual_ln: false`` scalars, ``visual_size != hidden``
  projections, frozen word embeddings, object class embeddings (``object_word_embed_mode`` 1/3),
  semantic image features, the VCR object-classification regulariser (``cnn_loss_reg``) and
  segmentation-masked RoI features (VCR ``segms``), the relationship (ITM) head.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch import Tensor, nn
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertPooler

from mmf_plugins.common.registry import registry
from mmf_plugins.models.base_model import BaseModel
from mmf_plugins.modules.bert_encoder import BertFusionEncoder
from mmf_plugins.modules.heads import LMPredictionHead, PredictionTransform
from mmf_plugins.processors.bbox_processors import geometry_embedding

logger = logging.getLogger(__name__)

HEAD_TYPES = ("pretraining", "vqa", "multiple_choice", "refcoco")
VISUAL_MODES = ("prec", "e2e")
CHOICE_LOSSES = ("bce", "ce")
VISUAL_TYPE = 2  # token type of every object and [END] (text keeps its segment ids 0/1)
PAD_LOGIT = -10000.0  # release's fill for region scores outside the image's regions


# ----------------------------------------------------------------------------------------- config
@dataclass
class VLBertConfig:
    """``model_config.vl_bert``: released defaults (``cfgs/*/base_*.yaml``); see configs/models/vl_bert/defaults.yaml."""

    model: str = "vl_bert"
    # text encoder (BERT base uncased); bert_model_name is a LOCAL Hugging Face BERT directory or null
    bert_model_name: str | None = None
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 3
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # visual feature embedding
    visual_feature_mode: str = "prec"  # prec: features from the sample | e2e: ResNet + RoIAlign from pixels
    visual_feature_dim: int = 2048  # prec RoI feature size (e2e: the backbone's C5 width)
    geometry_dim: int = 256  # frequencies per box coordinate (4 x 2 x 256 = 2048 geometry dims)
    geometry_wave_length: float = 1000.0
    visual_dropout: float = 0.1  # obj_downsample dropout
    visual_scale_text_init: float = 0.0  # visual_ln_text.weight init
    visual_scale_object_init: float = 0.0  # visual_ln_object.weight init
    add_image_box: bool = True  # whole image as region 0 (added here when the batch lacks it)
    max_seq_length: int | None = None  # text + regions budget (release pretraining: 64); null = no cut
    # e2e visual path
    backbone: str = "resnet101"
    backbone_weights: str | None = None  # local ResNet weights (torchvision names, e.g. resnet101-pt-vgbua)
    stride_in_1x1: bool = True
    res5_dilation: int = 2
    roi_output_size: int = 14
    roi_sampling_ratio: int = 1
    frozen_backbone_stages: list[int] = field(default_factory=lambda: [1, 2])  # 1 = stem, 2 = res2
    mask_raw_pixels: bool = True  # e2e MVRC: zero the pixels of replaced regions
    # heads
    training_head_type: str = "vqa"
    with_pooler: bool | None = None  # null: true for multiple_choice only (release cfgs)
    num_labels: int = 3129  # vqa answers (the registry's <dataset>_num_final_outputs wins when set)
    classifier_dropout: float = 0.1
    classifier_pretrained: bool = True  # vqa: answer rows = mean word embedding of the answer's tokens
    mask_token_id: int | None = None  # vqa: check the answer slot holds [MASK] (null: no check)
    num_choices: int = 4
    choice_loss: str = "bce"
    visual_region_classes: int = 1601  # MVRC classes (detector's cls_prob width)
    with_mlm_loss: bool = True
    with_mvrc_loss: bool = True
    mvrc_mask_probability: float = 0.15
    mvrc_replace_probability: float = 0.9


def vl_bert_config(config: DictConfig | dict | None = None) -> DictConfig:
    """Merge ``config`` over :class:`VLBertConfig` (unknown keys are errors) and validate it."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(VLBertConfig), config or {})
    except (ConfigKeyError, ValidationError) as e:
        known = ", ".join(f.name for f in fields(VLBertConfig))
        raise ValueError(f"invalid model_config.vl_bert: {e}. Known keys: {known}") from None
    for key, allowed in (("training_head_type", HEAD_TYPES), ("visual_feature_mode", VISUAL_MODES),
                         ("choice_loss", CHOICE_LOSSES), ("attn_implementation", ("sdpa", "eager"))):
        if cfg[key] not in allowed:
            raise ValueError(f"model_config.vl_bert.{key}={cfg[key]!r}; expected one of {', '.join(allowed)}")
    if cfg.type_vocab_size < 3:
        raise ValueError(f"model_config.vl_bert.type_vocab_size must be >= 3 (text 0/1, visual 2), got {cfg.type_vocab_size}")
    if cfg.max_seq_length is not None and cfg.max_seq_length < 3:
        raise ValueError(f"model_config.vl_bert.max_seq_length must be >= 3 or null, got {cfg.max_seq_length}")
    for key in ("mvrc_mask_probability", "mvrc_replace_probability"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise ValueError(f"model_config.vl_bert.{key} must be in [0, 1], got {cfg[key]}")
    if cfg.num_choices < 1:
        raise ValueError(f"model_config.vl_bert.num_choices must be >= 1, got {cfg.num_choices}")
    return cfg


def bert_config_from(cfg: DictConfig) -> BertConfig:
    """transformers ``BertConfig`` from the fields (a ``bert_model_name`` directory must agree with them)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "initializer_range", "layer_norm_eps")
    config = BertConfig(**{k: cfg[k] for k in keys})
    config._attn_implementation = cfg.attn_implementation
    return config


# --------------------------------------------------------------------------------- sequence rules
def truncation_lengths(text_len: Tensor, region_len: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Per-sample kept (text, region) counts under ``text + regions <= budget``, the release's loop
    (``conceptual_captions.py``) in closed form: while over budget, drop a region if there are more
    regions than tokens, else a token; stop when either is 0; keep at least 2 tokens and 1 region.
    Samples without regions are not cut (the release's loop never starts)."""
    t, r = text_len.long(), region_len.long()
    excess = (t + r - budget).clamp(min=0)
    text_first = t >= r  # ties drop a token
    only_text = text_first & (excess <= t - r + 1)
    only_regions = ~text_first & (excess <= r - t)
    t_new = torch.where(only_text, t - excess, torch.where(only_regions, t, torch.full_like(t, budget // 2)))
    r_new = torch.where(only_text, r, torch.where(only_regions, r - excess, torch.full_like(r, (budget + 1) // 2)))
    cut = (excess > 0) & (r > 0) & (t > 0)
    t_new = torch.where(cut, torch.maximum(t_new, t.clamp(max=2)), t)
    r_new = torch.where(cut, torch.maximum(r_new, r.clamp(max=1)), r)
    return t_new, r_new


def truncate_masks(text_mask: Tensor, region_mask: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Apply :func:`truncation_lengths` to left-aligned masks: text keeps its first ``k - 1`` tokens and
    its last one ([SEP]); regions keep their first ``k``."""
    text_len, region_len = text_mask.sum(1), region_mask.sum(1)
    keep_t, keep_r = truncation_lengths(text_len, region_len, budget)
    pos_t = torch.arange(text_mask.size(1), device=text_mask.device)[None]
    text_keep = text_mask & ((pos_t < (keep_t - 1)[:, None]) | (pos_t == (text_len - 1)[:, None]))
    pos_r = torch.arange(region_mask.size(1), device=region_mask.device)[None]
    return text_keep, region_mask & (pos_r < keep_r[:, None])


@dataclass
class PackedSequence:
    """The joint sequence of :func:`pack_sequence`: ``embeddings (B, N, H)`` (word/visual sums, before
    position/type), ``token_type_ids``, ``position_ids``, ``attention_mask`` (B, N) and the slot masks
    ``text_slots`` / ``object_slots`` / ``end_slots`` (B, N)."""

    embeddings: Tensor
    token_type_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    text_slots: Tensor
    object_slots: Tensor
    end_slots: Tensor


def pack_sequence(text_emb: Tensor, text_types: Tensor, text_mask: Tensor, obj_emb: Tensor, obj_mask: Tensor,
                  end_emb: Tensor) -> PackedSequence:
    """``VisualLinguisticBert.embedding``'s layout: per row, the valid text tokens (in order), the valid
    objects, then [END], without gaps; N = max over rows of (text + objects) + 1. Types: text keeps its
    segment ids, objects and [END] get 2. Positions: text 0..L-1, all objects L, [END] L + 1."""
    B, _, H = text_emb.shape
    device = text_emb.device
    text_len = text_mask.sum(1, keepdim=True)
    obj_end = text_len + obj_mask.sum(1, keepdim=True)
    N = int(obj_end.max()) + 1 if B else 1
    grid = torch.arange(N, device=device)[None].expand(B, N)
    text_slots = grid < text_len
    object_slots = (grid >= text_len) & (grid < obj_end)
    end_slots = grid == obj_end
    emb = text_emb.new_zeros(B, N, H)
    emb[text_slots] = text_emb[text_mask]
    emb[object_slots] = obj_emb[obj_mask].to(emb.dtype)
    emb[end_slots] = end_emb.to(emb.dtype)
    types = text_types.new_full((B, N), VISUAL_TYPE)
    types[text_slots] = text_types[text_mask]
    positions = torch.where(text_slots, grid, torch.where(end_slots, text_len + 1, text_len.expand(B, N)))
    return PackedSequence(emb, types, positions, grid <= obj_end, text_slots, object_slots, end_slots)


def draw_region_masks(region_mask: Tensor, has_image_box: bool, probability: float,
                      replace_probability: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MVRC choice (``random_mask_region``): ``chosen`` real regions (p ``probability``; never the
    whole-image box at index 0), ``replaced`` a subset of them (p ``replace_probability``). Both (B, R) bool."""
    u = torch.rand(region_mask.shape, generator=generator, device=region_mask.device)
    v = torch.rand(region_mask.shape, generator=generator, device=region_mask.device)
    real = region_mask.clone()
    if has_image_box and real.size(1):
        real[:, 0] = False
    chosen = real & (u < probability)
    return chosen, chosen & (v < replace_probability)


def zero_box_pixels(images: Tensor, boxes: Tensor, batch_index: Tensor) -> Tensor:
    """Zero ``images[b, :, int(y1):int(y2)+1, int(x1):int(x2)+1]`` for each box (network-input pixels),
    the release's ``MASK_RAW_PIXELS`` after normalisation; union of boxes via a 2-D difference map."""
    if boxes.numel() == 0:
        return images
    B, _, H, W = images.shape
    x1 = boxes[:, 0].floor().long().clamp(0, W)
    y1 = boxes[:, 1].floor().long().clamp(0, H)
    x2 = (boxes[:, 2].floor().long() + 1).clamp(0, W)
    y2 = (boxes[:, 3].floor().long() + 1).clamp(0, H)
    diff = torch.zeros(B, H + 1, W + 1, device=images.device)
    ones = torch.ones_like(x1, dtype=diff.dtype)
    for ys, xs, sign in ((y1, x1, 1.0), (y1, x2, -1.0), (y2, x1, -1.0), (y2, x2, 1.0)):
        diff.index_put_((batch_index, ys, xs), ones * sign, accumulate=True)
    cover = diff.cumsum(1).cumsum(2)[:, :H, :W] > 0.5
    return images.masked_fill(cover[:, None], 0.0)


# ------------------------------------------------------------------------------------------- blocks
@dataclass
class TextInputs:
    """``ids, types, mask (bool), tags`` (B, T): tags index the regions (0 = whole-image box)."""

    ids: Tensor
    types: Tensor
    mask: Tensor
    tags: Tensor


@dataclass
class RegionInputs:
    """Regions of a batch: ``boxes (B, R, 4)`` xyxy in original-image pixels (row 0 = whole image when
    ``has_image_box``), ``image_size (B, 2)`` (W, H), ``mask (B, R)`` bool; prec ``features (B, R, D)``;
    e2e ``images (B, 3, h, w)`` and ``scale (B, 2)`` (network-input pixels per original pixel, x and y);
    ``cls_prob (B, R, C)`` when the batch has the detector's class distribution."""

    boxes: Tensor
    image_size: Tensor
    mask: Tensor
    has_image_box: bool
    features: Tensor | None = None
    images: Tensor | None = None
    scale: Tensor | None = None
    cls_prob: Tensor | None = None


def _move_stride_to_1x1(layer: nn.Module) -> None:
    """Caffe-style bottleneck (``stride_in_1x1``): the first block's stride goes from the 3x3 to the 1x1 conv."""
    block = layer[0]
    if not hasattr(block, "conv3"):
        raise ValueError("stride_in_1x1 needs a bottleneck ResNet (resnet50/101/152); set stride_in_1x1: false")
    stride = block.conv2.stride
    block.conv1.stride, block.conv2.stride = stride, (1, 1)


def build_roi_features(cfg: DictConfig) -> nn.Module:
    """The e2e visual path (release ``FastRCNN`` without the box head): torchvision ResNet C4 trunk ->
    RoIAlign 14x14 @1/16 (legacy, sampling ratio 1) -> res5 (dilated) -> mean. Frozen BN; stages in
    ``frozen_backbone_stages`` (1 = stem, 2 = res2, ...) get no gradient."""
    from mmf_plugins.modules.roi_features import (
        ResNetRoIFeatures,
        build_torchvision_resnet,
    )

    resnet = build_torchvision_resnet(cfg.backbone, res5_dilation=int(cfg.res5_dilation))
    if cfg.stride_in_1x1:
        for name in ("layer2", "layer3") + (("layer4",) if cfg.res5_dilation == 1 else ()):
            _move_stride_to_1x1(getattr(resnet, name))
    if cfg.res5_dilation == 2:  # the release dilates every res5 block, torchvision all but the first
        conv = resnet.layer4[0].conv2
        conv.dilation, conv.padding = (2, 2), (2, 2)
    if cfg.backbone_weights:
        from mmf_plugins.extraction.extractors import load_backbone_weights

        load_backbone_weights(resnet, os.path.expanduser(str(cfg.backbone_weights)), f"VL-BERT e2e backbone {cfg.backbone}")
    net = ResNetRoIFeatures.from_torchvision(
        resnet, output_size=int(cfg.roi_output_size), sampling_ratio=int(cfg.roi_sampling_ratio), aligned=False
    )
    stages = [net.trunk.stem, net.trunk.layer1, net.trunk.layer2, net.trunk.layer3, net.box_head]
    for stage in cfg.frozen_backbone_stages:
        if not 1 <= int(stage) <= 5:
            raise ValueError(f"frozen_backbone_stages entries must be 1..5 (1 = stem, 5 = res5), got {stage}")
        stages[int(stage) - 1].requires_grad_(False)
    return net


class RegionFeatureEmbedding(nn.Module):
    """Release ``FastRCNN`` (module ``image_feature_extractor``): per region ``[geometry ‖ RoI feature]``
    -> ``obj_downsample`` = Dropout -> Linear(8 x geometry_dim + D -> H) -> ReLU.

    ``forward(regions, replaced=None, mask_visual=None)`` -> ``(B, R, H)`` (zeros outside ``regions.mask``).
    ``replaced`` (B, R) marks MVRC-masked regions: their feature becomes ``mask_visual`` (D,) when given,
    and in e2e mode with ``mask_raw_pixels`` their pixels are zeroed before the backbone.
    """

    def __init__(self, hidden_size: int, feature_dim: int, *, geometry_dim: int, wave_length: float, dropout: float,
                 roi_features: nn.Module | None = None, mask_raw_pixels: bool = False):
        super().__init__()
        self.roi_features = roi_features
        self.feature_dim = int(roi_features.out_channels if roi_features is not None else feature_dim)
        self.geometry_dim = int(geometry_dim)
        self.wave_length = float(wave_length)
        self.mask_raw_pixels = bool(mask_raw_pixels and roi_features is not None)
        self.obj_downsample = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(8 * self.geometry_dim + self.feature_dim, hidden_size), nn.ReLU()
        )

    def roi_pool(self, regions: RegionInputs, replaced: Tensor | None) -> Tensor:
        """e2e RoI features of the valid regions, in ``regions.mask`` order: (N, D)."""
        images, mask = regions.images, regions.mask
        scaled = regions.boxes * regions.scale.repeat(1, 2)[:, None, :]
        if self.mask_raw_pixels and replaced is not None and bool(replaced.any()):
            b, i = replaced.nonzero(as_tuple=True)
            images = zero_box_pixels(images, scaled[b, i], b)
        per_image = [scaled[k][mask[k]] for k in range(mask.size(0))]
        return torch.cat(self.roi_features(images, per_image), dim=0)

    def forward(self, regions: RegionInputs, replaced: Tensor | None = None, mask_visual: Tensor | None = None) -> Tensor:
        mask = regions.mask
        B, R = mask.shape
        H = self.obj_downsample[1].out_features
        if self.roi_features is not None:
            feats = self.roi_pool(regions, replaced)
        else:
            feats = regions.features[mask]
        if replaced is not None and mask_visual is not None:
            feats = torch.where(replaced[mask][:, None], mask_visual.to(feats.dtype)[None], feats)
        size = regions.image_size[:, None, :].expand(B, R, 2)[mask]
        geometry = geometry_embedding(regions.boxes[mask], size[:, 0], size[:, 1], self.geometry_dim, self.wave_length)
        reps = self.obj_downsample(torch.cat([geometry.to(feats.dtype), feats], dim=-1))
        out = reps.new_zeros(B, R, H)
        out[mask] = reps
        return out


class VisualLinguisticBert(BertFusionEncoder):
    """Release ``VisualLinguisticBert`` (module ``vlbert``) on transformers' BERT pieces: ``embeddings``
    (word, position, token type (3 rows), LayerNorm, dropout), ``encoder``, plus ``end_embedding``,
    ``visual_ln_text`` / ``visual_ln_object`` and an optional ``pooler``.

    ``forward(text, text_visual (B,T,H), obj_visual (B,R,H), obj_linguistic (B,R,H), obj_mask (B,R))`` ->
    ``(text_hidden (B,T,H), object_hidden (B,R,H), pooled (B,H) | None)``; outputs sit at the inputs'
    positions (zeros where ``text.mask`` / ``obj_mask`` is false).
    """

    def __init__(self, config: BertConfig, *, with_pooler: bool, gradient_checkpointing: bool = False):
        super().__init__(config, gradient_checkpointing=gradient_checkpointing)
        H = config.hidden_size
        self.end_embedding = nn.Embedding(1, H)
        self.visual_ln_text = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.visual_ln_object = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.pooler = BertPooler(config) if with_pooler else None

    def embed(self, text: TextInputs, text_visual: Tensor, obj_visual: Tensor, obj_linguistic: Tensor,
              obj_mask: Tensor) -> tuple[Tensor, PackedSequence]:
        emb = self.embeddings
        text_emb = emb.word_embeddings(text.ids) + self.visual_ln_text(text_visual)
        obj_emb = obj_linguistic + self.visual_ln_object(obj_visual)
        packed = pack_sequence(text_emb, text.types, text.mask, obj_emb, obj_mask, self.end_embedding.weight[0])
        if int(packed.position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"{int(text.mask.sum(1).max())} text tokens need positions up to {int(packed.position_ids.max())} "
                f"(objects and [END] follow the text) but max_position_embeddings={self.config.max_position_embeddings}; "
                "lower the text processor's max_seq_length or set model_config.vl_bert.max_seq_length"
            )
        x = packed.embeddings + emb.position_embeddings(packed.position_ids) + emb.token_type_embeddings(packed.token_type_ids)
        return emb.dropout(emb.LayerNorm(x)), packed

    def forward(self, text: TextInputs, text_visual: Tensor, obj_visual: Tensor, obj_linguistic: Tensor,
                obj_mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x, packed = self.embed(text, text_visual, obj_visual, obj_linguistic, obj_mask)
        hidden = BertFusionEncoder.forward(self, x, packed.attention_mask.long())
        text_hidden = hidden.new_zeros(*text.ids.shape, hidden.size(-1))
        text_hidden[text.mask] = hidden[packed.text_slots]
        obj_hidden = hidden.new_zeros(*obj_mask.shape, hidden.size(-1))
        obj_hidden[obj_mask] = hidden[packed.object_slots]
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return text_hidden, obj_hidden, pooled


# --------------------------------------------------------------------------------------------- model
@registry.register_model("vl_bert")
class VLBertModel(BaseModel):
    """VL-BERT with its head chosen by ``training_head_type`` (module docstring).

    Batch fields: ``input_ids, input_mask, segment_ids`` (B, T) — (B, C, T) for ``multiple_choice`` —
    and optional ``text_tags`` (same shape; region index per token, default 0); regions from
    ``image_info_0.{bbox (B, R, 4) px, max_features | num_boxes (B,), image_width, image_height,
    has_image_box?, cls_prob?, scale?}`` plus ``image_feature_0 (B, R, 2048)`` (prec) or ``image`` (e2e);
    labels ``lm_label_ids`` (pretraining), ``targets`` (vqa: soft scores; multiple_choice: index),
    ``region_targets`` (refcoco). Text-only pretraining batches carry ``text_only`` and no visual fields.
    """

    Config = VLBertConfig

    def __init__(self, config: DictConfig | dict | None = None):
        super().__init__(config)
        self.config = vl_bert_config(self.config)

    @classmethod
    def config_path(cls) -> str:
        return "configs/models/vl_bert/defaults.yaml"

    # ----------------------------------------------------------------------------------- build
    def build(self) -> None:
        cfg = self.config
        head = cfg.training_head_type
        self.bert_config = bert_config_from(cfg)
        H = self.bert_config.hidden_size
        with_pooler = cfg.with_pooler if cfg.with_pooler is not None else head == "multiple_choice"
        self.vlbert = VisualLinguisticBert(self.bert_config, with_pooler=bool(with_pooler),
                                           gradient_checkpointing=cfg.gradient_checkpointing)
        roi = build_roi_features(cfg) if cfg.visual_feature_mode == "e2e" else None
        self.image_feature_extractor = RegionFeatureEmbedding(
            H, cfg.visual_feature_dim, geometry_dim=cfg.geometry_dim, wave_length=cfg.geometry_wave_length,
            dropout=cfg.visual_dropout, roi_features=roi, mask_raw_pixels=cfg.mask_raw_pixels,
        )
        D = self.image_feature_extractor.feature_dim
        self.object_linguistic_embeddings = nn.Embedding(1, H)
        if head == "pretraining":
            if cfg.visual_feature_mode == "prec" or not cfg.mask_raw_pixels:
                self.object_mask_visual_embedding = nn.Embedding(1, D)
            if cfg.with_mvrc_loss:
                self.object_mask_word_embedding = nn.Embedding(1, H)
                self.mvrc_head = MVRCHead(H, cfg.visual_region_classes, cfg.hidden_act)
            self.aux_text_visual_embedding = nn.Embedding(1, H)
            if cfg.with_mlm_loss:
                self.mlm_head = LMPredictionHead(H, cfg.vocab_size, hidden_act=cfg.hidden_act,
                                                 layer_norm_eps=cfg.layer_norm_eps)
        elif head == "vqa":
            self.num_labels = self._registered_num_labels()
            self.final_mlp = nn.Sequential(
                PredictionTransform(H, H, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps),
                nn.Dropout(cfg.classifier_dropout), nn.Linear(H, self.num_labels),
            )
        elif head == "multiple_choice":
            self.final_mlp = nn.Sequential(nn.Dropout(cfg.classifier_dropout), nn.Linear(H, 1))
        else:  # refcoco
            self.final_mlp = nn.Sequential(MVRCTransform(H, cfg.hidden_act), nn.Dropout(cfg.classifier_dropout),
                                           nn.Linear(H, 1))
        self._init_weights()
        if cfg.bert_model_name:
            self._load_pretrained_bert(cfg.bert_model_name)
        if hasattr(self, "mlm_head"):
            self.mlm_head.tie_to(self.vlbert.word_embeddings)
        self._answer_tokens = self._answer_token_ids() if head == "vqa" and cfg.classifier_pretrained else None
        if self._answer_tokens is not None:
            self.init_answer_classifier(self._answer_tokens)
            self.register_load_state_dict_post_hook(_reinit_answers_after_load)

    def _init_weights(self) -> None:
        """Release init: N(0, initializer_range) for BERT-side Linear/Embedding, LayerNorm 1/0 with the visual
        LayerNorm weights at ``visual_scale_*_init`` (0), ``object_mask_visual_embedding`` 0, classifier
        Linear layers Xavier-uniform; ``obj_downsample`` and the ResNet keep torch/torchvision init."""
        std = self.bert_config.initializer_range

        def bert_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        for name, child in self.named_children():
            if name not in ("image_feature_extractor", "final_mlp"):
                child.apply(bert_init)
        with torch.no_grad():
            self.vlbert.visual_ln_text.weight.fill_(self.config.visual_scale_text_init)
            self.vlbert.visual_ln_object.weight.fill_(self.config.visual_scale_object_init)
            if hasattr(self, "object_mask_visual_embedding"):
                self.object_mask_visual_embedding.weight.zero_()
            if hasattr(self, "mlm_head"):
                self.mlm_head.bias.zero_()
        if hasattr(self, "final_mlp"):
            for module in self.final_mlp.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    def _load_pretrained_bert(self, path: str) -> None:
        """Release ``load_language_pretrained_model``: embeddings, token-type rows 0/1 (row 2 stays new),
        encoder, pooler (when present) and, from the MLM head, ``mlm_head`` / the VQA ``final_mlp.0``."""
        from transformers import BertForPreTraining

        from mmf_plugins.modules.bert_encoder import (
            _check_bert_dir,
            _quiet_transformers,
        )

        path = _check_bert_dir(os.path.expanduser(str(path)))
        with _quiet_transformers():
            hf, info = BertForPreTraining.from_pretrained(path, local_files_only=True, output_loading_info=True)
        src, own = hf.bert, self.vlbert
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(hf.config, key) != getattr(self.bert_config, key):
                raise ValueError(
                    f"bert_model_name={path}: {key}={getattr(hf.config, key)} but model_config.vl_bert.{key}="
                    f"{getattr(self.bert_config, key)}; set the model's architecture keys to the directory's config.json"
                )
        if hf.config.num_hidden_layers < self.bert_config.num_hidden_layers:
            raise ValueError(f"bert_model_name={path} has {hf.config.num_hidden_layers} layers, fewer than "
                             f"num_hidden_layers={self.bert_config.num_hidden_layers}")
        with torch.no_grad():
            for name in ("word_embeddings", "position_embeddings"):
                getattr(own.embeddings, name).weight.copy_(getattr(src.embeddings, name).weight)
            rows = src.embeddings.token_type_embeddings.weight
            own.embeddings.token_type_embeddings.weight[: rows.size(0)].copy_(rows)
            own.embeddings.LayerNorm.load_state_dict(src.embeddings.LayerNorm.state_dict())
            for mine, theirs in zip(own.encoder.layer, src.encoder.layer):
                mine.load_state_dict(theirs.state_dict())
            if own.pooler is not None and src.pooler is not None:
                own.pooler.load_state_dict(src.pooler.state_dict())
            missing = set(info.get("missing_keys", []))
            if not any(k.startswith("cls.predictions.transform") for k in missing):
                transform = hf.cls.predictions.transform
                if hasattr(self, "mlm_head"):
                    self.mlm_head.transform.load_state_dict(transform.state_dict())
                    bias = hf.cls.predictions.bias if hf.cls.predictions.bias is not None else hf.cls.predictions.decoder.bias
                    self.mlm_head.bias.copy_(bias)
                if self.config.training_head_type == "vqa":
                    self.final_mlp[0].load_state_dict(transform.state_dict())
        logger.info("VL-BERT: text encoder initialised from %s (%d of %d layers)", path,
                    self.bert_config.num_hidden_layers, hf.config.num_hidden_layers)

    def _registered_num_labels(self) -> int:
        # the trainer sets num_labels to the dataset's answer vocabulary (<dataset>_num_final_outputs)
        # before building the model, so the config is the single source here
        return int(self.config.num_labels)

    def _answer_token_ids(self) -> list[list[int]] | None:
        """Word-piece ids of each answer of the run's VQA dataset (registry), for ``classifier_pretrained``."""
        name, answers = _registered_dataset_value("answer_processor")
        text_cfg = registry.get(f"{name}_text_processor_config") if name else None
        if answers is None or text_cfg is None or not hasattr(answers, "answer_list"):
            logger.info("VL-BERT: no answer vocabulary registered; classifier_pretrained skipped")
            return None
        from mmf_plugins.processors.text_processors import load_tokenizer

        run = registry.get("config")
        data_dir = (run.get("dataset_config") or {}).get(name, {}).get("data_dir") or (run.get("env") or {}).get("data_dir")
        data_dir = str(data_dir) if data_dir else None
        tokenizer = load_tokenizer((text_cfg.get("params") or {}).get("tokenizer_config"), data_dir)
        encode = tokenizer.backend_tokenizer.encode
        return [encode(a, add_special_tokens=False).ids for a in answers.answer_list]

    @torch.no_grad()
    def init_answer_classifier(self, answer_token_ids: list[list[int]]) -> None:
        """Release ``CLASSIFIER_PRETRAINED``: answer ``k``'s row of ``final_mlp[-1].weight`` = mean word
        embedding of its tokens (answers without tokens keep their row)."""
        linear = self.final_mlp[-1]
        if len(answer_token_ids) != linear.out_features:
            raise ValueError(f"{len(answer_token_ids)} answers given for a classifier of {linear.out_features} outputs")
        word = self.vlbert.word_embeddings.weight
        for k, ids in enumerate(answer_token_ids):
            if ids:
                linear.weight[k] = word[torch.as_tensor(ids, device=word.device)].mean(0)

    def get_optimizer_parameters(self, config) -> list[dict]:
        """One group, weight decay on every parameter (the release's AdamW / SGD groups)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def format_state_key(self, key: str) -> str:
        from mmf_plugins.models.vl_bert.convert_vl_bert import rename_vl_bert_key

        return rename_vl_bert_key(key)

    # ------------------------------------------------------------------------------- inputs
    def _text_inputs(self, sample_list, dims: int) -> TextInputs:
        missing = [k for k in ("input_ids", "input_mask", "segment_ids") if sample_list.get(k) is None]
        if missing:
            raise KeyError(f"VL-BERT needs {', '.join(missing)} in the batch; add a BERT text processor "
                           "(processors.text_processor: {type: bert_tokenizer})")
        ids = sample_list["input_ids"].long()
        if ids.dim() != dims:
            shape = "(B, C, T) (one row per candidate)" if dims == 3 else "(B, T)"
            raise ValueError(f"input_ids must be {shape} for training_head_type={self.config.training_head_type}, "
                             f"got shape {tuple(ids.shape)}")
        tags = sample_list.get("text_tags")
        tags = torch.zeros_like(ids) if tags is None else tags.long()
        if tags.shape != ids.shape:
            raise ValueError(f"text_tags {tuple(tags.shape)} must match input_ids {tuple(ids.shape)}")
        return TextInputs(ids, sample_list["segment_ids"].long(), sample_list["input_mask"].bool(), tags)

    def _region_inputs(self, sample_list) -> RegionInputs:
        cfg = self.config
        info = sample_list.get("image_info_0")
        if info is None or info.get("bbox") is None:
            raise KeyError(
                "VL-BERT needs image_info_0.bbox (B x R x 4 xyxy pixels) with image_width/image_height and "
                "max_features (region counts); use a feature dataset with the bbox processor (format: vl_bert) "
                "or a dataset that gives boxes with its images (e2e)"
            )
        boxes = info["bbox"].float()
        if boxes.dim() != 3 or boxes.size(-1) != 4:
            raise ValueError(f"image_info_0.bbox must be (B, R, 4) xyxy pixels, got {tuple(boxes.shape)}")
        B, R = boxes.shape[:2]
        device = boxes.device
        size = torch.stack([_per_sample(info, k, B, device) for k in ("image_width", "image_height")], dim=1)
        counts = info.get("max_features", info.get("num_boxes"))
        counts = torch.full((B,), R, device=device) if counts is None else torch.as_tensor(counts, device=device).view(-1)
        mask = torch.arange(R, device=device)[None] < counts[:, None]
        has = info.get("has_image_box")
        has = torch.zeros(B, dtype=torch.bool) if has is None else torch.as_tensor(has).view(-1).bool()
        if bool(has.any()) != bool(has.all()):
            raise ValueError("image_info_0.has_image_box differs inside the batch; use one bbox format per dataset")
        w1, h1 = (size[:, 0] - 1)[:, None], (size[:, 1] - 1)[:, None]
        boxes = torch.stack([boxes[..., 0].clamp(min=0).minimum(w1), boxes[..., 1].clamp(min=0).minimum(h1),
                             boxes[..., 2].clamp(min=0).minimum(w1), boxes[..., 3].clamp(min=0).minimum(h1)], dim=-1)
        regions = RegionInputs(boxes, size, mask, bool(has.all()) and B > 0, cls_prob=info.get("cls_prob"))
        if regions.cls_prob is not None and regions.cls_prob.shape[:2] != (B, R):
            raise ValueError(f"image_info_0.cls_prob {tuple(regions.cls_prob.shape)} must be (B, R, C) with (B, R) = {(B, R)}")
        if cfg.visual_feature_mode == "prec":
            feats = sample_list.get("image_feature_0")
            if feats is None:
                raise KeyError("VL-BERT (visual_feature_mode: prec) needs image_feature_0 (B x R x 2048 RoI features); "
                               "set use_features: true in the dataset config, or use visual_feature_mode: e2e with images")
            if feats.dim() != 3 or feats.shape[:2] != (B, R) or feats.size(-1) != self.image_feature_extractor.feature_dim:
                raise ValueError(
                    f"image_feature_0 must be (B, R, {self.image_feature_extractor.feature_dim}) matching image_info_0.bbox "
                    f"{(B, R)}, got {tuple(feats.shape)}; VL-BERT takes pure RoI features (bbox processor format: vl_bert)"
                )
            regions.features = feats.float()
        else:
            regions.images, regions.scale = self._e2e_images(sample_list, info, size)
        if cfg.add_image_box and not regions.has_image_box:
            regions = _prepend_image_box(regions, info.get("image_box_feature"))
        return regions

    def _e2e_images(self, sample_list, info, size: Tensor) -> tuple[Tensor, Tensor]:
        images = sample_list.get("image")
        if images is None or images.dim() != 4:
            raise KeyError("VL-BERT (visual_feature_mode: e2e) needs image (B x 3 x H x W, normalized); set use_images: true")
        B = images.size(0)
        scale = info.get("scale")
        if scale is not None:
            scale = torch.as_tensor(scale, device=images.device).float().view(B, -1).expand(B, 2)
        elif sample_list.get("image_mask") is not None:
            m = sample_list["image_mask"]
            scale = torch.stack([m[:, 0, :].sum(1), m[:, :, 0].sum(1)], dim=1).float() / size
        else:
            scale = torch.tensor([images.size(3), images.size(2)], device=images.device).float()[None] / size
        return images, scale

    def _apply_budget(self, text: TextInputs, region_mask: Tensor) -> tuple[TextInputs, Tensor]:
        budget = self.config.max_seq_length
        if budget is None:
            return text, region_mask
        text_mask, region_mask = truncate_masks(text.mask, region_mask, int(budget))
        return TextInputs(text.ids, text.types, text_mask, text.tags), region_mask

    # ------------------------------------------------------------------------------ encoding
    def object_reps(self, regions: RegionInputs, replaced: Tensor | None = None) -> Tensor:
        mask_visual = self.object_mask_visual_embedding.weight[0] if hasattr(self, "object_mask_visual_embedding") else None
        return self.image_feature_extractor(regions, replaced, mask_visual)

    def encode(self, text: TextInputs, obj_reps: Tensor | None, obj_mask: Tensor | None,
               replaced: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Text + objects -> ``(text_hidden, object_hidden, pooled)``. ``obj_reps`` None = text only: every
        token's visual embedding is ``aux_text_visual_embedding`` and there are no objects."""
        B, T = text.ids.shape
        H = self.bert_config.hidden_size
        if obj_reps is None:
            if not hasattr(self, "aux_text_visual_embedding"):
                raise ValueError("text-only batches need training_head_type: pretraining (aux_text_visual_embedding)")
            text_visual = self.aux_text_visual_embedding.weight[0].expand(B, T, H)
            obj_reps = text_visual.new_zeros(B, 0, H)
            obj_mask = torch.zeros(B, 0, dtype=torch.bool, device=text.ids.device)
        else:
            R = obj_reps.size(1)
            if R == 0:
                text_visual = obj_reps.new_zeros(B, T, H)
            else:
                bad = text.mask & ((text.tags >= R) | (text.tags < -1))
                if bool(bad.any()):
                    raise ValueError(f"text_tags {sorted(set(text.tags[bad].tolist()))[:5]} point past the {R} regions "
                                     "(0 = whole-image box, k = k-th region after it)")
                idx = text.tags.clamp(min=0)[..., None].expand(B, T, H)
                text_visual = obj_reps.gather(1, idx)
        linguistic = self.object_linguistic_embeddings.weight[0].expand(*obj_mask.shape, H)
        if replaced is not None and hasattr(self, "object_mask_word_embedding"):
            linguistic = torch.where(replaced[..., None], self.object_mask_word_embedding.weight[0], linguistic)
        return self.vlbert(text, text_visual, obj_reps, linguistic, obj_mask)

    # ------------------------------------------------------------------------------- forward
    def forward(self, sample_list) -> dict:
        head = self.config.training_head_type
        if head == "pretraining":
            return self._forward_pretraining(sample_list)
        if head == "multiple_choice":
            return self._forward_multiple_choice(sample_list)
        text = self._text_inputs(sample_list, 2)
        regions = self._region_inputs(sample_list)
        text, region_mask = self._apply_budget(text, regions.mask)
        text_hidden, obj_hidden, _ = self.encode(text, self.object_reps(regions), region_mask)
        if head == "vqa":
            return vqa_head(self, sample_list, text, text_hidden)
        return refcoco_head(self, sample_list, regions, region_mask, obj_hidden)

    def _forward_multiple_choice(self, sample_list) -> dict:
        text = self._text_inputs(sample_list, 3)
        B, C, T = text.ids.shape
        if C > self.config.num_choices:
            raise ValueError(f"batch has {C} candidates per question but model_config.vl_bert.num_choices="
                             f"{self.config.num_choices}; raise num_choices or drop candidates in the dataset")
        regions = self._region_inputs(sample_list)
        obj_reps = self.object_reps(regions)  # once per image, shared by its candidates
        flat = TextInputs(*(t.reshape(B * C, T) for t in (text.ids, text.types, text.mask, text.tags)))
        region_mask = regions.mask.repeat_interleave(C, dim=0)
        flat, region_mask = self._apply_budget(flat, region_mask)
        _, _, pooled = self.encode(flat, obj_reps.repeat_interleave(C, dim=0), region_mask)
        return multiple_choice_head(self, sample_list, pooled.view(B, C, -1))

    def _forward_pretraining(self, sample_list) -> dict:
        text = self._text_inputs(sample_list, 2)
        text_only = sample_list.get("text_only")
        if text_only is not None and bool(torch.as_tensor(text_only).any()):
            if not bool(torch.as_tensor(text_only).all()):
                raise ValueError("a batch mixes text-only and image-text samples; sample one dataset per batch")
            text_hidden, _, _ = self.encode(text, None, None)
            losses = {}
            logits = mlm_loss(self, sample_list, text, text_hidden, "mlm_aux", losses)
            return {"scores": logits, "losses": losses}
        regions = self._region_inputs(sample_list)
        chosen = replaced = None
        if self.config.with_mvrc_loss:
            if regions.cls_prob is None:
                raise KeyError("masked RoI classification needs image_info_0.cls_prob (the detector's class "
                               "distribution per region, 'cls_prob' in the feature records); extract features with "
                               "a detector that stores it, or set model_config.vl_bert.with_mvrc_loss: false")
            chosen, replaced = draw_region_masks(regions.mask, regions.has_image_box, self.config.mvrc_mask_probability,
                                                 self.config.mvrc_replace_probability)
            if regions.features is not None and regions.has_image_box:
                regions.features = _image_box_mean_of_visible(regions.features, regions.mask, replaced)
        text, region_mask = self._apply_budget(text, regions.mask)
        text_hidden, obj_hidden, _ = self.encode(text, self.object_reps(regions, replaced), region_mask, replaced)
        losses: dict = {}
        output = {"scores": mlm_loss(self, sample_list, text, text_hidden, "mlm", losses)}
        if chosen is not None:
            output.update(mvrc_loss(self, sample_list, regions, chosen & region_mask, obj_hidden, losses))
        output["losses"] = losses
        return output


def _reinit_answers_after_load(module: VLBertModel, incompatible) -> None:
    """After a load that filled the word embeddings but not the answer classifier, redo
    ``classifier_pretrained`` with the loaded embeddings (the release's order: partial load, then init)."""
    missing = set(incompatible.missing_keys)
    if "vlbert.embeddings.word_embeddings.weight" not in missing and "final_mlp.2.weight" in missing:
        module.init_answer_classifier(module._answer_tokens)


def _registered_dataset_value(suffix: str) -> tuple[str | None, Any]:
    """``(dataset, registry.get(f"{dataset}_{suffix}"))`` for the first dataset of the run that has it."""
    run = registry.get("config")
    names = str(run.get("datasets") or "").split(",") if run is not None else []
    for name in (n.strip() for n in names if n.strip()):
        value = registry.get(f"{name}_{suffix}")
        if value is not None:
            return name, value
    return None, None


def _per_sample(info, key: str, B: int, device) -> Tensor:
    value = info.get(key)
    if value is None:
        raise KeyError(f"VL-BERT needs image_info_0.{key} (one number per sample) to normalise the box geometry")
    return torch.as_tensor(value, device=device).float().view(-1).expand(B)


def _prepend_image_box(regions: RegionInputs, image_box_feature: Tensor | None) -> RegionInputs:
    """Whole image ``[0, 0, W-1, H-1]`` as region 0; prec feature = ``image_box_feature`` or the mean of
    the valid regions (zeros when there are none)."""
    B = regions.mask.size(0)
    W, H = regions.image_size[:, 0], regions.image_size[:, 1]
    zero = torch.zeros_like(W)
    image_box = torch.stack([zero, zero, W - 1, H - 1], dim=1)[:, None]
    boxes = torch.cat([image_box, regions.boxes], dim=1)
    mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=regions.mask.device), regions.mask], dim=1)
    features = regions.features
    if features is not None:
        if image_box_feature is not None:
            first = torch.as_tensor(image_box_feature, device=features.device).float().view(B, 1, -1)
        else:
            m = regions.mask[..., None].to(features.dtype)
            first = (features * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        features = torch.cat([first, features], dim=1)
    cls_prob = regions.cls_prob
    if cls_prob is not None:
        cls_prob = torch.cat([cls_prob.new_zeros(B, 1, cls_prob.size(-1)), cls_prob], dim=1)
    return RegionInputs(boxes, regions.image_size, mask, True, features, regions.images, regions.scale, cls_prob)


def _image_box_mean_of_visible(features: Tensor, mask: Tensor, replaced: Tensor) -> Tensor:
    """Row 0 (whole image) = mean feature of the real regions not replaced (zeros if none)."""
    visible = mask & ~replaced
    visible[:, 0] = False
    m = visible[..., None].to(features.dtype)
    mean = (features * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.cat([mean[:, None], features[:, 1:]], dim=1)


# --------------------------------------------------------------------------------------------- heads
class MVRCTransform(nn.Module):
    """Release ``VisualLinguisticBertMVRCHeadTransform``: dense + activation (no LayerNorm)."""

    def __init__(self, hidden_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = ACT2FN[hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class MVRCHead(nn.Module):
    """Masked RoI classification head: ``transform`` -> ``region_cls_pred`` (H -> detector classes)."""

    def __init__(self, hidden_size: int, num_classes: int, hidden_act: str = "gelu"):
        super().__init__()
        self.transform = MVRCTransform(hidden_size, hidden_act)
        self.region_cls_pred = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.region_cls_pred(self.transform(x))


def mlm_loss(model: VLBertModel, sample_list, text: TextInputs, text_hidden: Tensor, name: str, losses: dict) -> Tensor:
    """Masked LM over the kept text tokens with labels (``lm_label_ids``, -1 = none): CE mean over the
    masked tokens of the batch (0 when none). Returns the logits of the masked tokens (N, V)."""
    labels = sample_list.get("lm_label_ids")
    if labels is None or not hasattr(model, "mlm_head"):
        return text_hidden.new_zeros(0, model.config.vocab_size)
    labels = labels.long()
    if labels.shape != text.ids.shape:
        raise ValueError(f"lm_label_ids {tuple(labels.shape)} must match input_ids {tuple(text.ids.shape)}")
    picked = text.mask & (labels != -1)
    logits = model.mlm_head(text_hidden[picked])
    if logits.size(0):
        losses[model.loss_key(sample_list, name)] = F.cross_entropy(logits.float(), labels[picked])
    else:
        losses[model.loss_key(sample_list, name)] = text_hidden.sum() * 0.0
    return logits


def mvrc_loss(model: VLBertModel, sample_list, regions: RegionInputs, chosen: Tensor, obj_hidden: Tensor,
              losses: dict) -> dict:
    """Soft cross-entropy of the chosen regions' class logits against ``cls_prob`` (mean over regions)."""
    if regions.cls_prob.size(-1) != model.config.visual_region_classes:
        raise ValueError(f"image_info_0.cls_prob has {regions.cls_prob.size(-1)} classes but "
                         f"model_config.vl_bert.visual_region_classes={model.config.visual_region_classes}")
    logits = model.mvrc_head(obj_hidden[chosen])
    target = regions.cls_prob[chosen].float()
    if logits.size(0):
        loss = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    else:
        loss = obj_hidden.sum() * 0.0
    losses[model.loss_key(sample_list, "mvrc")] = loss
    return {"mvrc_scores": logits, "mvrc_mask": chosen}


def answer_positions(model: VLBertModel, text: TextInputs) -> Tensor:
    """Index of the answer slot per row: the first segment-1 token (``[MASK]`` of ``text_b: "[MASK]"``)."""
    slot = text.mask & (text.types == 1)
    has = slot.any(1)
    if not bool(has.all()):
        raise ValueError("vqa rows need the answer slot '[SEP] [MASK] [SEP]' (segment 1); set text_b: \"[MASK]\" "
                         "in the dataset config")
    pos = slot.float().argmax(1)
    mask_id = model.config.mask_token_id
    if mask_id is not None:
        got = text.ids.gather(1, pos[:, None]).squeeze(1)
        if bool((got != mask_id).any()):
            raise ValueError(f"answer slot holds token ids {sorted(set(got[got != mask_id].tolist()))[:5]}, not "
                             f"mask_token_id={mask_id}; check text_b: \"[MASK]\" and the tokenizer's [MASK] id")
    return pos


def vqa_head(model: VLBertModel, sample_list, text: TextInputs, text_hidden: Tensor) -> dict:
    pos = answer_positions(model, text)
    hidden = text_hidden[torch.arange(pos.size(0), device=pos.device), pos]
    logits = model.final_mlp(hidden)
    losses = {}
    targets = sample_list.get("targets")
    if targets is not None:
        if targets.shape != logits.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must be soft scores (B, {logits.size(1)})")
        losses[model.loss_key(sample_list, "logit_bce")] = (
            F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * logits.size(1)
        )
    return {"scores": logits, "losses": losses}


def multiple_choice_head(model: VLBertModel, sample_list, pooled: Tensor) -> dict:
    logits = model.final_mlp(pooled).squeeze(-1)  # (B, C)
    losses = {}
    targets = sample_list.get("targets")
    if targets is not None:
        targets = targets.argmax(-1) if targets.dim() == 2 else targets.long().view(-1)
        if bool(((targets < 0) | (targets >= logits.size(1))).any()):
            raise ValueError(f"targets {targets.tolist()[:8]} must index one of the {logits.size(1)} candidates")
        if model.config.choice_loss == "bce":
            onehot = F.one_hot(targets, logits.size(1)).float()
            losses[model.loss_key(sample_list, "logit_bce")] = F.binary_cross_entropy_with_logits(logits.float(), onehot)
        else:
            losses[model.loss_key(sample_list, "cross_entropy")] = F.cross_entropy(logits.float(), targets)
    return {"scores": logits, "losses": losses}


def refcoco_head(model: VLBertModel, sample_list, regions: RegionInputs, region_mask: Tensor, obj_hidden: Tensor) -> dict:
    logits = model.final_mlp(obj_hidden).squeeze(-1)  # (B, R)
    losses = {}
    targets = sample_list.get("region_targets")
    if targets is not None:
        targets = targets.float()
        R = logits.size(1)
        if targets.size(1) == R - 1 and model.config.add_image_box:  # the model added the whole-image box
            targets = torch.cat([_image_box_target(sample_list, regions, targets), targets], dim=1)
        if targets.shape != logits.shape:
            raise ValueError(f"region_targets {tuple(targets.shape)} must be (B, R) = {tuple(logits.shape)}, one per "
                             "region of image_info_0.bbox")
        losses[model.loss_key(sample_list, "logit_bce")] = F.binary_cross_entropy_with_logits(
            logits[region_mask].float(), targets[region_mask]
        )
    scores = logits.masked_fill(~region_mask, PAD_LOGIT)
    return {"scores": scores, "boxes": regions.boxes, "losses": losses}


def _image_box_target(sample_list, regions: RegionInputs, targets: Tensor) -> Tensor:
    gt = sample_list.get("gt_bbox")
    if gt is None:
        return targets.new_zeros(targets.size(0), 1)
    from torchvision.ops import box_iou

    iou = box_iou(regions.boxes[:, 0].float(), gt.float().view(-1, 4)).diagonal()
    return (iou >= 0.5).float()[:, None]
