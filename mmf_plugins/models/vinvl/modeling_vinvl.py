"""VinVL / OSCAR+ (Zhang et al., CVPR 2021; Li et al., ECCV 2020) on transformers' BERT with SDPA.

Follows microsoft/Oscar @266075f ``oscar/modeling/modeling_bert.py`` (``BertImgModel``,
``ImageBertForSequenceClassification``, ``ImageBertForMultipleChoice``, ``BertImgForPreTraining``,
``BertForImageCaptioning``, ``BertCaptioningLoss``) and the input formation of ``oscar/run_*.py``.
Read top to bottom: config -> masks and inputs -> encoder (``BertImgModel``) -> heads -> the
registered model (``vinvl``, alias ``oscar``) -> caption decoding.

Sequence = ``[CLS] text_a [SEP] text_b(tags) [SEP] [PAD]...`` (segment 0/1, word+position+type
embeddings) followed by the region tokens ``Dropout(LayerNorm?(Linear(2054 -> H)(features)))`` with no
position / type embedding; one BERT encoder over the concatenation; additive ``(1 - m) * -10000`` mask
(2-D padding mask, or the 3-D captioning mask). Parameter names equal the official checkpoints
(``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``bert.pooler.*``, ``bert.img_embedding.*``,
``bert.LayerNorm.*`` (image LayerNorm, OSCAR+ only), ``classifier.*``, ``cls.predictions.*``,
``cls.seq_relationship.*``), so ``convert_vinvl.py`` renames almost nothing.

Heads (``training_head_type``): ``vqa`` / ``classification`` / ``snli_ve`` (pooled [CLS] -> dropout ->
linear|mlp classifier; loss ``bce`` = BCE-with-logits mean x num_labels, ``xe``/``sfmx`` CE, ``kl``),
``retrieval`` (2-way classifier; ``scores`` = softmax[:, 1] for ranking, CE on ``is_correct``), ``nlvr2``
(the two (text, image) pairs of a sample encoded separately, pooled outputs concatenated -> mlp with
the LayerNorm variant when ``use_img_layernorm``; 2-way CE), ``pretraining`` (masked-token loss on text
and tags with the tied LM head + 2/3-way contrastive head on pooled [CLS]), ``captioning`` (seq2seq mask,
masked-token training with label smoothing, beam search / greedy decoding with a KV cache).

Deliberate differences from the release:
* SDPA attention (transformers ``sdpa``; ``attn_implementation: eager`` for the reference kernel).
* The LM head is evaluated on masked positions only (same loss, no ``(B*T, vocab)`` product).
* Regions beyond ``max_img_seq_length`` are dropped in the model as well (the release does it in the
  dataset); 2048-d features get the 6 box dims appended from ``image_info_0.bbox`` when
  ``append_box_dims`` (the release stores 2054-d features).
* Captioning: tag position ids are ``max_caption_length + rank`` (the release's value when the caption is
  padded to ``max_seq_a_length``, whatever the text processor's layout); the pooler is not evaluated and
  its weights are frozen (kept for checkpoint compatibility; avoids unused-parameter errors under DDP);
  the caption loss counts its own training calls for ``drop_worst_after``.
* Decoding caches per-layer keys/values (upstream caches layer inputs): the tags+regions prefix is
  encoded once per image, each step feeds only the new tokens plus ``[MASK]``. Same math as full
  recompute (``use_cache: false``), which is kept for checking.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertPooler,
)

from mmf_plugins.common.registry import registry
from mmf_plugins.models.base_model import BaseModel
from mmf_plugins.modules.beam_search import beam_search, greedy_search
from mmf_plugins.modules.heads import (
    CLASSIFIER_KINDS,
    LMPredictionHead,
    build_classifier,
)
from mmf_plugins.processors.bbox_processors import oscar_box_features

logger = logging.getLogger(__name__)

CLASSIFICATION_HEADS = ("vqa", "classification", "snli_ve")
HEAD_TYPES = (*CLASSIFICATION_HEADS, "retrieval", "nlvr2", "pretraining", "captioning")
LOSS_TYPES = ("bce", "xe", "sfmx", "kl")
LOSS_NAMES = {"bce": "logit_bce", "xe": "cross_entropy", "sfmx": "cross_entropy", "kl": "kl_div"}
IMG_FEATURE_TYPES = ("frcnn", "faster_r-cnn")
MASK_VALUE = -10000.0  # NOTE(parity): the release's additive mask value; keeps fully masked rows finite
BOX_DIMS = 6


# ----------------------------------------------------------------------------------------- config
@dataclass
class VinVLConfig:
    """``model_config.vinvl`` (official defaults = OSCAR+ base; ``configs/models/vinvl/defaults.yaml``)."""

    model: str = "vinvl"
    # text encoder: a local Hugging Face BERT directory, or null for random init from the fields below
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
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "sdpa"
    # image branch
    img_feature_dim: int = 2054
    img_feature_type: str = "frcnn"
    use_img_layernorm: bool = True
    img_layer_norm_eps: float = 1e-12
    append_box_dims: bool = True
    max_seq_length: int = 128
    max_img_seq_length: int = 50
    # heads
    training_head_type: str = "vqa"
    num_labels: int = 3129
    classifier: str = "linear"
    cls_hidden_scale: int = 2
    cls_num_layers: int = 1  # mmf_mlp only
    loss_type: str = "bce"
    num_choice: int = 2
    num_contrast_classes: int = 3
    # captioning
    max_caption_length: int = 40  # max_seq_a_length
    label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 20000
    tie_weights: bool = True
    freeze_embedding: bool = True
    num_beams: int = 5
    max_gen_length: int = 20
    length_penalty: float = 1.0
    num_keep_best: int = 1
    use_cache: bool = True
    generate_in_eval: bool = True
    bos_token_id: int = 101  # [CLS]
    eos_token_id: int = 102  # [SEP]
    mask_token_id: int = 103  # [MASK]
    pad_token_id: int = 0  # [PAD]


def vinvl_config(config: DictConfig | dict | None = None) -> DictConfig:
    """Merge ``config`` over :class:`VinVLConfig` (unknown keys are errors) and validate it."""
    base = OmegaConf.structured(VinVLConfig)
    try:
        cfg = OmegaConf.merge(base, config or {})
    except (ConfigKeyError, ValidationError) as e:
        known = ", ".join(f.name for f in fields(VinVLConfig))
        raise ValueError(f"invalid model_config.vinvl: {e}. Known keys: {known}") from None
    checks = (
        ("training_head_type", HEAD_TYPES),
        ("classifier", CLASSIFIER_KINDS),
        ("loss_type", LOSS_TYPES),
        ("img_feature_type", IMG_FEATURE_TYPES),
        ("attn_implementation", ("sdpa", "eager")),
    )
    for key, allowed in checks:
        if cfg[key] not in allowed:
            raise ValueError(f"model_config.vinvl.{key}={cfg[key]!r}; expected one of {', '.join(allowed)}")
    if cfg.num_contrast_classes not in (2, 3):
        raise ValueError(f"model_config.vinvl.num_contrast_classes must be 2 or 3, got {cfg.num_contrast_classes}")
    if cfg.training_head_type in ("retrieval", "nlvr2") and cfg.num_labels != 2:
        raise ValueError(
            f"training_head_type={cfg.training_head_type} is a 2-way classifier; set model_config.vinvl.num_labels=2 "
            f"(got {cfg.num_labels})"
        )
    if cfg.img_feature_dim < 1 or cfg.max_img_seq_length < 1:
        raise ValueError(
            f"img_feature_dim ({cfg.img_feature_dim}) and max_img_seq_length ({cfg.max_img_seq_length}) must be >= 1"
        )
    return cfg


def bert_config_from(cfg: DictConfig) -> BertConfig:
    """The transformers ``BertConfig``: from ``bert_model_name`` (architecture) + our dropouts, or the fields."""
    arch = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.layer_norm_eps,
    }
    if cfg.bert_model_name:
        path = _local_bert_dir(cfg.bert_model_name)
        loaded = BertConfig.from_pretrained(path, local_files_only=True)
        arch = {k: getattr(loaded, k) for k in arch}
    return BertConfig(
        **arch,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        pad_token_id=cfg.pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def _local_bert_dir(path: str) -> str:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"bert_model_name={path!r} is not a local Hugging Face BERT directory (needs config.json and "
            "model.safetensors or pytorch_model.bin). Save one with "
            "`BertForPreTraining.from_pretrained('bert-base-uncased').save_pretrained(DIR)` where there is network, "
            "or set model_config.vinvl.bert_model_name=null for random init"
        )
    return path


# ------------------------------------------------------------------------------- masks and inputs
def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0/1 mask ``(B, K)`` or ``(B, Q, K)`` -> additive ``(B, 1, 1|Q, K)`` with 0 / -10000."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    else:
        raise ValueError(f"attention mask must be (B, K) or (B, Q, K), got shape {tuple(mask.shape)}")
    return (1.0 - mask.to(dtype)) * MASK_VALUE


def region_mask_from_counts(counts: Tensor | Any, num_regions: int, device: torch.device) -> Tensor:
    """``(B,)`` region counts (MMF ``image_info_0.max_features``) -> bool ``(B, R)``."""
    counts = torch.as_tensor(counts, device=device)
    if counts.dim() == 2 and counts.size(1) == 1:
        counts = counts[:, 0]
    if counts.dim() != 1:
        raise ValueError(
            f"image_info.max_features must hold one region count per sample (shape (B,)), got shape {tuple(counts.shape)}"
        )
    return torch.arange(num_regions, device=device)[None, :] < counts[:, None].to(torch.long)


def box_features(bbox: Tensor, width: Tensor, height: Tensor) -> Tensor:
    """OSCAR's 6 box dims ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`` for ``(B, R, 4)`` xyxy pixel boxes and
    per-image ``(B,)`` sizes: ``processors.bbox_processors.oscar_box_features`` over the whole batch."""
    B, R = bbox.shape[:2]
    w = torch.as_tensor(width, device=bbox.device).reshape(-1).repeat_interleave(R)
    h = torch.as_tensor(height, device=bbox.device).reshape(-1).repeat_interleave(R)
    return oscar_box_features(bbox.reshape(B * R, 4), w, h).view(B, R, BOX_DIMS)


def seq2seq_attention_mask(caption_mask: Tensor, context_mask: Tensor, region_mask: Tensor) -> Tensor:
    """Captioning mask ``(B, T+R, T+R)`` (run_captioning.py ``CaptionTensorizer``).

    ``caption_mask (B, T)``: caption tokens ([CLS] caption [SEP]); ``context_mask (B, T)``: tag tokens;
    ``region_mask (B, R)``. Caption -> caption lower-triangular (by index), caption -> tags/regions full,
    tags/regions <-> tags/regions full, tags/regions -> caption none; padding rows/columns zero.
    """
    B, T = caption_mask.shape
    R = region_mask.size(1)
    pad = caption_mask.new_zeros(B, R)
    cap = torch.cat([caption_mask.bool(), pad.bool()], dim=1)  # (B, S)
    ctx = torch.cat([context_mask.bool(), region_mask.bool()], dim=1)  # (B, S)
    causal = torch.ones(T + R, T + R, dtype=torch.bool, device=cap.device).tril()
    keys_for_caption = (cap[:, None, :] & causal[None]) | ctx[:, None, :]
    mask = (cap[:, :, None] & keys_for_caption) | (ctx[:, :, None] & ctx[:, None, :])
    return mask.to(torch.long)


def caption_position_ids(tag_mask: Tensor, tag_start: int) -> Tensor:
    """Position ids ``arange(T)`` with tag tokens renumbered ``tag_start + rank`` (decode-consistent)."""
    B, T = tag_mask.shape
    base = torch.arange(T, device=tag_mask.device).expand(B, T)
    rank = torch.cumsum(tag_mask.long(), dim=1) - 1
    return torch.where(tag_mask.bool(), tag_start + rank, base)


def left_align(ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move the ``keep`` tokens of each row to the front: ``(B, L) ids, (B, L) bool`` with L = max count."""
    order = torch.sort((~keep.bool()).long(), dim=1, stable=True).indices
    counts = keep.bool().sum(dim=1)
    length = int(counts.max().item()) if counts.numel() else 0
    order = order[:, :length]
    valid = torch.arange(length, device=ids.device)[None, :] < counts[:, None]
    return ids.gather(1, order) * valid, valid


@dataclass
class VinVLInputs:
    """One (text, image) batch: ``input_ids, segment_ids, text_mask (B, T)``, ``img_feats (B, R, D)``,
    ``region_mask (B, R)``."""

    input_ids: Tensor
    segment_ids: Tensor
    text_mask: Tensor
    img_feats: Tensor
    region_mask: Tensor

    def attention_mask(self) -> Tensor:
        return torch.cat([self.text_mask.long(), self.region_mask.long()], dim=1)

    def trimmed(self) -> "VinVLInputs":
        """The same batch without the trailing text and region columns that are padding in every row.

        Exact for every head that reads [CLS] or per-token outputs at valid positions: padded keys are
        masked out of attention and positions stay 0..T-1. Processors pad text to ``max_seq_length``
        (32 on the shapes demo, questions use about 14), so this removes a third of the encoder's work.
        """
        T, R = _used_columns(self.text_mask), _used_columns(self.region_mask)
        if T == self.input_ids.size(1) and R == self.img_feats.size(1):
            return self
        T = max(T, 1)
        return VinVLInputs(self.input_ids[:, :T], self.segment_ids[:, :T], self.text_mask[:, :T],
                           self.img_feats[:, :R], self.region_mask[:, :R])


def _used_columns(mask: Tensor) -> int:
    """1 + the last column that is valid in some row (0 when none is): masks need not be prefixes."""
    if mask.numel() == 0:
        return 0
    used = mask.any(0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


# ------------------------------------------------------------------------------------ encoder
class VinVLBertImgModel(nn.Module):
    """``BertImgModel``: BERT text embeddings ‖ region embeddings -> BERT encoder -> pooler.

    ``forward(input_ids (B,T), token_type_ids (B,T), attention_mask (B,S)|(B,S,S) 0/1, img_feats (B,R,D),
    position_ids=None)`` -> ``(sequence_output (B, S, H), pooled_output (B, H) | None)``, S = T + R.
    """

    def __init__(self, config: BertConfig, *, img_feature_dim: int, use_img_layernorm: bool, img_layer_norm_eps: float):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.img_embedding = nn.Linear(img_feature_dim, config.hidden_size)
        # NOTE(parity): the image LayerNorm sits at ``bert.LayerNorm`` in OSCAR+ checkpoints
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=img_layer_norm_eps) if use_img_layernorm else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_text(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    def embed_regions(self, img_feats: Tensor) -> Tensor:
        x = self.img_embedding(img_feats)
        if self.LayerNorm is not None:
            x = self.LayerNorm(x)
        return self.dropout(x)

    def encode(self, embeddings: Tensor, attention_mask: Tensor, cache: Any = None) -> Tensor:
        mask = additive_mask(attention_mask, embeddings.dtype)
        return self.encoder(embeddings, attention_mask=mask, cache=cache).last_hidden_state

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor,
        attention_mask: Tensor,
        img_feats: Tensor,
        position_ids: Tensor | None = None,
        with_pooler: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        text = self.embed_text(input_ids, token_type_ids, position_ids)
        regions = self.embed_regions(img_feats.to(text.dtype))
        sequence = self.encode(torch.cat([text, regions], dim=1), attention_mask)
        return sequence, (self.pooler(sequence) if with_pooler else None)


# --------------------------------------------------------------------------------------- heads
class VinVLPreTrainingHeads(nn.Module):
    """``cls``: ``predictions`` (tied masked-LM head) and, for pretraining, ``seq_relationship``
    (the 2/3-way contrastive classifier on the pooled [CLS])."""

    def __init__(self, config: BertConfig, num_contrast_classes: int | None):
        super().__init__()
        self.predictions = LMPredictionHead(
            config.hidden_size, config.vocab_size, hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps
        )
        if num_contrast_classes:
            self.seq_relationship = nn.Linear(config.hidden_size, num_contrast_classes)


class BertCaptioningLoss(nn.Module):
    """Label-smoothed masked-token loss (run_captioning.py ``BertCaptioningLoss``).

    Target: ``1 - eps`` on the gold token, ``eps / (V - 1)`` elsewhere; loss = KL(target || softmax)
    summed over the vocabulary (computed in closed form, no ``(N, V)`` one-hot); after
    ``drop_worst_after`` training calls the ``drop_worst_ratio`` largest losses are dropped; mean.
    """

    def __init__(self, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.2, drop_worst_after: int = 20000):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0 or not 0.0 <= drop_worst_ratio < 1.0:
            raise ValueError(
                f"label_smoothing ({label_smoothing}) and drop_worst_ratio ({drop_worst_ratio}) must be in [0, 1)"
            )
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.num_calls = 0

    def per_token(self, logits: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        gold = log_p.gather(1, target[:, None]).squeeze(1)
        eps = self.label_smoothing
        if eps == 0.0:
            return -gold
        V = logits.size(-1)
        off = eps / (V - 1)
        target_entropy = (1 - eps) * math.log(1 - eps) + eps * math.log(off)  # sum t log t
        return target_entropy - (1 - eps) * gold - off * (log_p.sum(dim=-1) - gold)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.training:
            self.num_calls += 1
        loss = self.per_token(logits, target)
        if self.drop_worst_ratio > 0 and self.num_calls > self.drop_worst_after:
            keep = int(loss.numel() * (1 - self.drop_worst_ratio))
            loss = torch.topk(loss, k=max(keep, 1), largest=False).values
        return loss.mean()


def classification_loss(logits: Tensor, targets: Tensor, loss_type: str) -> Tensor:
    """``bce``: BCE-with-logits mean x num_labels (soft scores); ``xe``/``sfmx``: cross entropy (class ids or
    soft targets); ``kl``: KL(targets || softmax) batch mean."""
    num_labels = logits.size(-1)
    logits = logits.float()
    if loss_type == "bce":
        if targets.dim() == 1:
            targets = F.one_hot(targets.long(), num_labels)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype)) * num_labels
    if loss_type in ("xe", "sfmx"):
        if targets.dim() == 2 and targets.dtype.is_floating_point:
            return F.cross_entropy(logits, targets.to(logits.dtype))
        return F.cross_entropy(logits, targets.long().view(-1))
    if loss_type == "kl":
        if targets.dim() == 1:
            targets = F.one_hot(targets.long(), num_labels)
        return F.kl_div(F.log_softmax(logits, dim=-1), targets.to(logits.dtype), reduction="batchmean")
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


# --------------------------------------------------------------------------------------- model
@registry.register_model("oscar")
@registry.register_model("vinvl")
class VinVLModel(BaseModel):
    """VinVL / OSCAR+ with its head chosen by ``training_head_type`` (see the module docstring).

    ``forward(sample_list)`` reads ``input_ids, input_mask, segment_ids (B, T)``, ``image_feature_0
    (B, R, 2054 | 2048)``, ``image_info_0.{max_features | num_boxes, bbox, image_width, image_height}``
    (NLVR2 also ``image_feature_1`` / ``image_info_1``; ``input_ids`` may then be ``(B, 2, T)``), and the
    labels of its head: ``targets`` (vqa / nlvr2 / snli_ve), ``is_correct`` (retrieval), ``lm_label_ids``
    and ``contrastive_labels`` (pretraining), ``lm_label_ids`` (captioning). Returns ``scores`` and
    ``losses`` (keyed ``{dataset_type}/{dataset_name}/{name}``); retrieval adds ``logits``, captioning in
    eval mode adds ``caption_ids (B, max_gen_length - 1)`` (no [CLS]; [SEP] then [PAD]), ``caption_scores``
    and ``captions`` (list of B strings, what the caption metrics read) when the dataset registered a
    decoder as ``registry.register(f"{dataset_name}_caption_decoder", fn)``, ``fn(ids (B, L)) -> list[str]``
    (the ``coco`` builder registers its text processor's ``batch_decode``; the model never sees a tokenizer).
    """

    Config = VinVLConfig

    def __init__(self, config: DictConfig | dict | None = None):
        super().__init__(config)
        self.config = vinvl_config(self.config)
        self._warned_no_decoder: set = set()

    @classmethod
    def config_path(cls) -> str:
        return "configs/models/vinvl/defaults.yaml"

    # ----------------------------------------------------------------------------- build
    def build(self) -> None:
        cfg = self.config
        bert_cfg = bert_config_from(cfg)
        self.bert_config = bert_cfg
        self.bert = VinVLBertImgModel(
            bert_cfg, img_feature_dim=cfg.img_feature_dim, use_img_layernorm=cfg.use_img_layernorm,
            img_layer_norm_eps=cfg.img_layer_norm_eps,
        )
        H = bert_cfg.hidden_size
        head = cfg.training_head_type
        if head in (*CLASSIFICATION_HEADS, "retrieval", "nlvr2"):
            self.dropout = nn.Dropout(bert_cfg.hidden_dropout_prob)
            pair = head == "nlvr2"
            self.classifier = build_classifier(
                cfg.classifier,
                cfg.num_choice * H if pair else H,
                cfg.num_labels,
                hidden_dim=H * cfg.cls_hidden_scale,
                # NOTE(parity): only ImageBertForMultipleChoice adds the LayerNorm, iff use_img_layernorm
                layer_norm_eps=bert_cfg.layer_norm_eps if (pair and cfg.classifier == "mlp" and cfg.use_img_layernorm) else None,
                num_layers=cfg.cls_num_layers,
                dropout=bert_cfg.hidden_dropout_prob,
            )
        elif head == "pretraining":
            self.cls = VinVLPreTrainingHeads(bert_cfg, cfg.num_contrast_classes)
        else:  # captioning
            self.cls = VinVLPreTrainingHeads(bert_cfg, None)
            self.caption_loss = BertCaptioningLoss(cfg.label_smoothing, cfg.drop_worst_ratio, cfg.drop_worst_after)
        self.apply(self._init_weights)
        if cfg.bert_model_name:
            self._load_pretrained_bert(cfg.bert_model_name)
        self._tie_and_freeze()

    def _init_weights(self, module: nn.Module) -> None:
        """Oscar ``init_weights``: N(0, initializer_range) for Linear/Embedding, zero bias, LayerNorm 1/0."""
        std = self.bert_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LMPredictionHead):
            nn.init.zeros_(module.bias)

    def _load_pretrained_bert(self, path: str) -> None:
        from transformers import BertForPreTraining

        hf = BertForPreTraining.from_pretrained(_local_bert_dir(path), local_files_only=True)
        self.bert.embeddings.load_state_dict(hf.bert.embeddings.state_dict())
        self.bert.encoder.load_state_dict(hf.bert.encoder.state_dict())
        self.bert.pooler.load_state_dict(hf.bert.pooler.state_dict())
        if hasattr(self, "cls"):
            pred = hf.cls.predictions
            self.cls.predictions.transform.dense.load_state_dict(pred.transform.dense.state_dict())
            self.cls.predictions.transform.LayerNorm.load_state_dict(pred.transform.LayerNorm.state_dict())
            with torch.no_grad():
                bias = pred.bias if pred.bias is not None else pred.decoder.bias
                self.cls.predictions.bias.copy_(bias)
        logger.info("VinVL: text encoder initialised from %s", path)

    def _tie_and_freeze(self) -> None:
        cfg = self.config
        word = self.bert.embeddings.word_embeddings
        if cfg.training_head_type == "pretraining":
            self.cls.predictions.tie_to(word)
        elif cfg.training_head_type == "captioning":
            if cfg.tie_weights:
                self.cls.predictions.tie_to(word)
            if cfg.freeze_embedding:
                word.weight.requires_grad_(False)
            self.bert.pooler.requires_grad_(False)

    def format_state_key(self, key: str) -> str:
        from mmf_plugins.models.vinvl.convert_vinvl import rename_oscar_key

        return rename_oscar_key(key)

    # ----------------------------------------------------------------------------- inputs
    def _region_inputs(self, sample_list, index: int) -> tuple[Tensor, Tensor]:
        cfg = self.config
        key = f"image_feature_{index}"
        feats = sample_list.get(key)
        if feats is None:
            raise KeyError(
                f"VinVL needs '{key}' (B x R x {cfg.img_feature_dim} region features) in the batch; "
                "set dataset_config.<dataset>.use_features: true"
            )
        if feats.dim() != 3:
            raise ValueError(f"{key} must be (B, R, D), got shape {tuple(feats.shape)}")
        info = sample_list.get(f"image_info_{index}") or {}
        D = feats.size(-1)
        if D != cfg.img_feature_dim:
            feats = self._append_box_dims(feats, info, index)
        B, R = feats.shape[:2]
        counts = info.get("max_features")
        if counts is None:
            counts = info.get("num_boxes")
        if counts is None:
            region_mask = torch.ones(B, R, dtype=torch.bool, device=feats.device)
        else:
            region_mask = region_mask_from_counts(counts, R, feats.device)
        keep = cfg.max_img_seq_length
        param = self.bert.img_embedding.weight
        return feats[:, :keep].to(param.dtype), region_mask[:, :keep]

    def _append_box_dims(self, feats: Tensor, info, index: int) -> Tensor:
        cfg = self.config
        D = feats.size(-1)
        bbox = info.get("bbox")
        if D + BOX_DIMS != cfg.img_feature_dim or not cfg.append_box_dims or bbox is None:
            raise ValueError(
                f"image_feature_{index} has {D} dims but model_config.vinvl.img_feature_dim={cfg.img_feature_dim} "
                f"(2048 RoI feature + 6 box dims). Fix: use 2054-d VinVL features, or give 2048-d features with "
                f"image_info_{index}.bbox (B x R x 4 xyxy pixels + image_width/image_height) and "
                f"model_config.vinvl.append_box_dims=true"
            )
        if bbox.dim() != 3 or bbox.shape[:2] != feats.shape[:2] or bbox.size(-1) not in (4, BOX_DIMS):
            raise ValueError(
                f"image_info_{index}.bbox must be (B, R, 4) xyxy pixels or (B, R, 6) OSCAR box dims matching "
                f"image_feature_{index} {tuple(feats.shape[:2])}, got {tuple(bbox.shape)}"
            )
        if bbox.size(-1) == 4:
            width, height = info.get("image_width"), info.get("image_height")
            if width is None or height is None:
                raise ValueError(
                    f"image_info_{index} needs image_width and image_height to normalise the 4-d bbox into box dims"
                )
            bbox = box_features(bbox.float(), width, height)
        return torch.cat([feats, bbox.to(feats.dtype)], dim=-1)

    def _text_inputs(self, sample_list) -> tuple[Tensor, Tensor, Tensor]:
        missing = [k for k in ("input_ids", "input_mask", "segment_ids") if sample_list.get(k) is None]
        if missing:
            raise KeyError(
                f"VinVL needs {', '.join(missing)} in the batch; add a BERT text processor "
                "(dataset_config.<dataset>.processors.text_processor: {type: bert_tokenizer})"
            )
        return sample_list["input_ids"].long(), sample_list["segment_ids"].long(), sample_list["input_mask"].bool()

    def inputs(self, sample_list, index: int = 0) -> VinVLInputs:
        """Model inputs of image ``index`` (text shared); see :class:`VinVLInputs`."""
        ids, seg, mask = self._text_inputs(sample_list)
        if ids.size(1) > self.bert_config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {ids.size(1)} tokens > max_position_embeddings={self.bert_config.max_position_embeddings}; "
                "lower the text processor's max_seq_length"
            )
        feats, region_mask = self._region_inputs(sample_list, index)
        return VinVLInputs(ids, seg, mask, feats, region_mask)

    def _labels(self, sample_list, *names: str) -> Tensor | None:
        for name in names:
            value = sample_list.get(name)
            if value is not None:
                return value
        return None

    # ----------------------------------------------------------------------------- forward
    def forward(self, sample_list) -> dict:
        head = self.config.training_head_type
        if head == "nlvr2":
            return self._forward_pair(sample_list)
        if head == "pretraining":
            return self._forward_pretraining(sample_list)
        if head == "captioning":
            return self._forward_captioning(sample_list)
        return self._forward_classification(sample_list)

    def _forward_classification(self, sample_list) -> dict:
        inp = self.inputs(sample_list).trimmed()
        _, pooled = self.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats)
        logits = self.classifier(self.dropout(pooled))
        losses = {}
        if self.config.training_head_type == "retrieval":
            output = {"scores": logits.float().softmax(dim=-1)[:, 1], "logits": logits}
            labels = self._labels(sample_list, "is_correct")
            if labels is not None:
                losses[self.loss_key(sample_list, "cross_entropy")] = F.cross_entropy(logits.float(), labels.long().view(-1))
        else:
            output = {"scores": logits}
            targets = self._labels(sample_list, "targets")
            if targets is not None:
                name = LOSS_NAMES[self.config.loss_type]
                losses[self.loss_key(sample_list, name)] = classification_loss(logits, targets, self.config.loss_type)
        output["losses"] = losses
        return output

    def _forward_pair(self, sample_list) -> dict:
        """NLVR2 ``--use_pair``: rows (sample, image 0), (sample, image 1) encoded separately."""
        C = self.config.num_choice
        ids, seg, mask = self._text_inputs(sample_list)
        if ids.dim() == 2:  # one text for both images
            ids, seg, mask = (t[:, None].expand(-1, C, -1) for t in (ids, seg, mask))
        if ids.dim() != 3 or ids.size(1) != C:
            raise ValueError(f"nlvr2 input_ids must be (B, T) or (B, {C}, T), got {tuple(ids.shape)}")
        regions = [self._region_inputs(sample_list, i) for i in range(C)]
        R = max(f.size(1) for f, _ in regions)
        feats = torch.stack([F.pad(f, (0, 0, 0, R - f.size(1))) for f, _ in regions], dim=1)
        rmask = torch.stack([F.pad(m, (0, R - m.size(1))) for _, m in regions], dim=1)
        B, _, T = ids.shape
        attn = torch.cat([mask.reshape(B * C, T).long(), rmask.reshape(B * C, R).long()], dim=1)
        _, pooled = self.bert(ids.reshape(B * C, T), seg.reshape(B * C, T), attn, feats.reshape(B * C, R, -1))
        logits = self.classifier(self.dropout(pooled).reshape(B, C * pooled.size(-1)))
        losses = {}
        targets = self._labels(sample_list, "targets")
        if targets is not None:
            name = LOSS_NAMES[self.config.loss_type]
            losses[self.loss_key(sample_list, name)] = classification_loss(logits, targets, self.config.loss_type)
        return {"scores": logits, "losses": losses}

    def _masked_positions(self, sample_list, T: int) -> tuple[Tensor | None, Tensor | None]:
        labels = self._labels(sample_list, "lm_label_ids")
        if labels is None:
            return None, None
        labels = labels.long()
        if labels.size(1) < T:
            raise ValueError(f"lm_label_ids has {labels.size(1)} positions, fewer than the {T} text tokens")
        labels = labels[:, :T]  # NOTE(parity): region slots carry -1 upstream; they never hold labels
        return labels != -1, labels

    def _forward_pretraining(self, sample_list) -> dict:
        inp = self.inputs(sample_list).trimmed()
        T = inp.input_ids.size(1)
        sequence, pooled = self.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats)
        contrast_logits = self.cls.seq_relationship(pooled)
        losses = {}
        masked, labels = self._masked_positions(sample_list, T)
        if masked is not None:
            hidden = sequence[:, :T][masked]
            if hidden.size(0) > 0:
                mlm_logits = self.cls.predictions(hidden)
                losses[self.loss_key(sample_list, "masked_lm_loss")] = F.cross_entropy(mlm_logits.float(), labels[masked])
            else:  # nothing masked in this batch: a zero that keeps the graph (upstream gives NaN)
                losses[self.loss_key(sample_list, "masked_lm_loss")] = sequence.sum() * 0.0
        # MMF's processor emits ``contrastive_label``; both spellings name the same field
        contrast = self._labels(sample_list, "contrastive_labels", "contrastive_label")
        if contrast is not None:
            losses[self.loss_key(sample_list, "contrastive_loss")] = F.cross_entropy(
                contrast_logits.float(), contrast.long().view(-1), ignore_index=-1
            )
        return {"scores": contrast_logits, "losses": losses}

    def _forward_captioning(self, sample_list) -> dict:
        cfg = self.config
        inp = self.inputs(sample_list)
        output: dict = {"losses": {}}
        masked, labels = self._masked_positions(sample_list, inp.input_ids.size(1))
        if masked is not None and bool(masked.any()):
            cap = inp.text_mask & (inp.segment_ids == 0)
            tags = inp.text_mask & (inp.segment_ids == 1)
            attn = seq2seq_attention_mask(cap, tags, inp.region_mask)
            pos = caption_position_ids(tags, cfg.max_caption_length)
            sequence, _ = self.bert(inp.input_ids, inp.segment_ids, attn, inp.img_feats, position_ids=pos, with_pooler=False)
            logits = self.cls.predictions(sequence[:, : inp.input_ids.size(1)][masked])
            output["losses"][self.loss_key(sample_list, "caption_loss")] = self.caption_loss(logits, labels[masked])
            output["scores"] = logits
        if not self.training and cfg.generate_in_eval:
            output.update(self.generate(sample_list))
            output["scores"] = output["caption_scores"]
            captions = self.decode_captions(sample_list, output["caption_ids"])
            if captions is not None:
                output["captions"] = captions
        if "scores" not in output:
            raise ValueError(
                "captioning forward needs lm_label_ids with at least one masked caption token "
                "(mask_caption_tokens in models/vinvl/pretraining_data.py), or eval mode with generate_in_eval: true"
            )
        return output

    # ----------------------------------------------------------------------------- decoding
    def decode_captions(self, sample_list, caption_ids: Tensor) -> list[str] | None:
        """Strings for ``caption_ids`` from the decoder the batch's dataset registered as
        ``{dataset_name}_caption_decoder``; ``None`` (logged once) when there is none."""
        name = sample_list.get("dataset_name")
        decoder = registry.get(f"{name}_caption_decoder")
        if decoder is None:
            if name not in self._warned_no_decoder:
                self._warned_no_decoder.add(name)
                logger.warning(
                    "no caption decoder registered for dataset %r: eval outputs carry caption_ids only, and caption "
                    "metrics (which read output['captions'] strings) will fail. A caption dataset's builder registers "
                    "one in update_registry_for_model as registry.register('%s_caption_decoder', fn)", name, name,
                )
            return None
        return list(decoder(caption_ids.detach().cpu()))

    @torch.no_grad()
    def generate(
        self,
        sample_list,
        *,
        num_beams: int | None = None,
        max_length: int | None = None,
        use_cache: bool | None = None,
        length_penalty: float | None = None,
        num_keep_best: int | None = None,
    ) -> dict:
        """Caption the images of ``sample_list`` from their tags (segment-1 tokens) and regions.

        At step t the input is ``[CLS] w1 .. w_{t-1} [MASK]`` (+ tags + regions) and the logits at
        ``[MASK]`` give ``w_t`` (as in training). ``num_beams == 1`` decodes greedily. Returns token ids
        ``caption_ids (B, max_length - 1)`` (``(B, num_keep_best, max_length - 1)`` when ``num_keep_best > 1``)
        and ``caption_scores (B,)`` / ``(B, num_keep_best)``; :meth:`decode_captions` turns ids into text.
        """
        if self.config.training_head_type != "captioning":
            raise ValueError(f"generate() needs training_head_type=captioning, got {self.config.training_head_type}")
        cfg = self.config
        num_beams = cfg.num_beams if num_beams is None else num_beams
        max_length = cfg.max_gen_length if max_length is None else max_length
        use_cache = cfg.use_cache if use_cache is None else use_cache
        length_penalty = cfg.length_penalty if length_penalty is None else length_penalty
        num_keep_best = cfg.num_keep_best if num_keep_best is None else num_keep_best
        if num_beams == 1 and num_keep_best != 1:
            raise ValueError(f"greedy decoding (num_beams=1) keeps one caption, got num_keep_best={num_keep_best}")

        inp = self.inputs(sample_list)
        tag_ids, tag_valid = left_align(inp.input_ids, inp.text_mask & (inp.segment_ids == 1))
        # NOTE(parity): od_labels_start_posid = max(max_seq_a_length, max_gen_length)
        tag_start = max(cfg.max_caption_length, max_length)
        if tag_start + tag_ids.size(1) > self.bert_config.max_position_embeddings:
            raise ValueError(
                f"max_gen_length={max_length} with {tag_ids.size(1)} tag tokens does not fit "
                f"max_position_embeddings={self.bert_config.max_position_embeddings}"
            )
        make = self._cached_decoder if use_cache else self._full_decoder
        step, reorder = make(inp, tag_ids, tag_valid, tag_start, num_beams)
        B = inp.input_ids.size(0)
        common = {
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "max_length": max_length, "device": inp.input_ids.device,
        }
        if num_beams == 1:
            tokens, scores = greedy_search(step, B, **common)
        else:
            tokens, scores = beam_search(
                step, B, num_beams=num_beams, length_penalty=length_penalty, num_keep_best=num_keep_best,
                reorder_fn=reorder, **common,
            )
        captions = tokens[:, :, 1:]
        if num_keep_best == 1:
            captions, scores = captions[:, 0], scores[:, 0]
        return {"caption_ids": captions, "caption_scores": scores}

    def _next_token_log_probs(self, hidden: Tensor) -> Tensor:
        return F.log_softmax(self.cls.predictions(hidden).float(), dim=-1)

    def _full_decoder(self, inp: VinVLInputs, tag_ids, tag_valid, tag_start: int, num_beams: int):
        """Uncached step: re-encode ``[CLS] w.. [MASK] tags regions`` with the captioning mask each step."""
        rep = lambda t: t.repeat_interleave(num_beams, dim=0)
        tag_ids, tag_valid = rep(tag_ids), rep(tag_valid)
        feats, region_mask = rep(inp.img_feats), rep(inp.region_mask)
        N, Lt = tag_ids.shape
        device = tag_ids.device
        tag_pos = tag_start + torch.arange(Lt, device=device)

        def step(tokens: Tensor) -> Tensor:
            t = tokens.size(1)
            cap = torch.cat([tokens, tokens.new_full((N, 1), self.config.mask_token_id)], dim=1)
            ids = torch.cat([cap, tag_ids], dim=1)
            seg = torch.cat([torch.zeros_like(cap), torch.ones_like(tag_ids)], dim=1)
            cap_mask = torch.cat([torch.ones_like(cap, dtype=torch.bool), torch.zeros_like(tag_valid)], dim=1)
            ctx_mask = torch.cat([torch.zeros_like(cap, dtype=torch.bool), tag_valid], dim=1)
            pos = torch.cat([torch.arange(t + 1, device=device), tag_pos])[None].expand(N, -1)
            attn = seq2seq_attention_mask(cap_mask, ctx_mask, region_mask)
            sequence, _ = self.bert(ids, seg, attn, feats, position_ids=pos, with_pooler=False)
            return self._next_token_log_probs(sequence[:, t])

        return step, None

    def _cached_decoder(self, inp: VinVLInputs, tag_ids, tag_valid, tag_start: int, num_beams: int):
        """Cached step: tags+regions encoded once per image; each step feeds the uncommitted tokens + [MASK]."""
        bert = self.bert
        B, Lt = tag_ids.shape
        device = tag_ids.device
        tag_pos = (tag_start + torch.arange(Lt, device=device))[None].expand(B, -1)
        prefix = torch.cat(
            [bert.embed_text(tag_ids, torch.ones_like(tag_ids), tag_pos), bert.embed_regions(inp.img_feats)], dim=1
        )
        prefix_valid = torch.cat([tag_valid, inp.region_mask], dim=1)
        cache = CaptionKVCache()
        bert.encode(prefix, prefix_valid.long(), cache=cache)
        cache.finish_prefix(num_beams)
        prefix_valid = prefix_valid.repeat_interleave(num_beams, dim=0)
        N, P = prefix_valid.shape

        def step(tokens: Tensor) -> Tensor:
            done = cache.caption_length
            new = torch.cat([tokens[:, done:], tokens.new_full((N, 1), self.config.mask_token_id)], dim=1)
            n = new.size(1)
            pos = torch.arange(done, done + n, device=device)[None].expand(N, -1)
            emb = bert.embed_text(new, torch.zeros_like(new), pos)
            mask = torch.cat(
                [
                    prefix_valid[:, None, :].expand(N, n, P).long(),
                    torch.ones(N, n, done, dtype=torch.long, device=device),
                    torch.ones(n, n, dtype=torch.long, device=device).tril()[None].expand(N, n, n),
                ],
                dim=2,
            )
            hidden = bert.encode(emb, mask, cache=cache)
            cache.commit(n - 1)  # the [MASK] slot is recomputed as a real token next step
            return self._next_token_log_probs(hidden[:, -1])

        return step, cache.reorder


class CaptionKVCache:
    """Per-layer keys/values for caption decoding: the tags+regions prefix, the committed caption tokens,
    and the tokens of the current step (kept pending until :meth:`commit`).

    transformers' ``BertSelfAttention`` calls ``update(key, value, layer_idx)`` with ``(N, heads, n, d)``
    tensors and attends to what it returns. Keys are ordered [prefix, caption, new]; the attention mask
    built by the caller follows the same order. ``reorder(index)`` re-gathers the caption rows only: the
    prefix is identical for all beams of an example and beam search keeps rows inside their example.
    """

    def __init__(self) -> None:
        self.prefix: dict[int, tuple[Tensor, Tensor]] = {}
        self.caption: dict[int, tuple[Tensor, Tensor]] = {}
        self.pending: dict[int, tuple[Tensor, Tensor]] = {}
        self.recording_prefix = True
        self.caption_length = 0

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.recording_prefix:
            self.prefix[layer_idx] = (key, value)
            return key, value
        self.pending[layer_idx] = (key, value)
        keys, values = [self.prefix[layer_idx][0]], [self.prefix[layer_idx][1]]
        if layer_idx in self.caption:
            keys.append(self.caption[layer_idx][0])
            values.append(self.caption[layer_idx][1])
        keys.append(key)
        values.append(value)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def finish_prefix(self, repeat: int) -> None:
        if repeat > 1:
            self.prefix = {i: (k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for i, (k, v) in self.prefix.items()}
        self.recording_prefix = False

    def commit(self, n: int) -> None:
        for i, (k, v) in self.pending.items():
            k, v = k[:, :, :n], v[:, :, :n]
            if i in self.caption:
                k = torch.cat([self.caption[i][0], k], dim=2)
                v = torch.cat([self.caption[i][1], v], dim=2)
            self.caption[i] = (k, v)
        self.pending = {}
        self.caption_length += n

    def reorder(self, index: Tensor) -> None:
        self.caption = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.caption.items()}

