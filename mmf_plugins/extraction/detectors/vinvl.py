"""VinVL X152-C4 object-attribute detector (Faster R-CNN C4 + attribute head) on torchvision ops.

Paper: Zhang et al., "VinVL: Revisiting Visual Representations in Vision-Language Models", CVPR 2021.
Official: microsoft/scene_graph_benchmark 8e14944 (MIT): ``AttrRCNN`` with config
``sgg_configs/vgattr/vinvl_x152c4.yaml``; maskrcnn-benchmark ``modeling/backbone/resnet.py``,
``rpn/{anchor_generator,rpn,inference}.py``, ``roi_heads/box_head/{roi_box_feature_extractors,
roi_box_predictors,inference}.py``, ``box_coder.py``; ``scene_graph_benchmark/attribute_head/*``.
Written from the structure of those files, not copied.

Pipeline (test mode, one batch):
  uint8 RGB -> resize (min side 600 / max side 1000) -> BGR 0-255 minus PIXEL_MEAN -> zero-pad batch
  -> ResNeXt-152 32x8d C4 trunk (FrozenBN, stride in 3x3) -> RPN (15 anchors: sizes 32..512 x ratios
  0.5/1/2, stride 16; top 6000 by objectness -> decode -> clip -> NMS 0.7 -> top 300)
  -> RoIAlign 14x14 @1/16 (sampling_ratio 0, legacy aligned=False) -> res5 (stride-2 first block) -> avg pool
  -> 2048-d feature -> cls_score (1595) / bbox_pred (1595*4) -> NMS filter -> attribute head
  (cls_embedding(label) || feature -> fc_attr + ReLU -> attr_score (525), softmax).

NMS filters (``MODEL.ROI_HEADS.NMS_FILTER``):
  0 - maskrcnn-benchmark per-class postprocess: pairs with score > thresh, per-class NMS (0.5), cap at
      max_boxes; threshold halved up to 10 times while fewer than min_boxes survive;
  1 - "Peter Anderson" (BUTD): per-class NMS 0.3 over all pairs, each box keeps its best surviving class,
      keep score >= thresh clamped to [min_boxes, max_boxes] (the README extraction command);
  2 - class-agnostic: best foreground score per box, one NMS (0.5) over boxes, same clamping
      (the released VinVL features, folders named ``nm_filter_2``).

Module names follow the official checkpoint (``backbone.body.*``, ``rpn.head.*``,
``roi_heads.box.{feature_extractor.head.layer4,predictor}.*``, ``attribute.{feature_extractor,predictor}.*``)
so ``convert_vinvl_detector.py`` renames almost nothing.

Deliberate differences from the original:
* per-class NMS (modes 0 and 1) runs for all classes at once (``batched_class_nms``: greedy NMS with
  per-class overlap bitmasks, one loop over score ranks, none over classes); survivors equal
  ``torchvision.ops.nms`` class by class (tested). The original loops over 1594 classes in Python.
  ``torchvision.ops.batched_nms`` (class ids as idxs) is not used: over 300 x 1594 pairs it falls back to
  a Python loop over classes on CPU and would need a 478k x 478k overlap mask on GPU.
* mode 1 first runs NMS only on pairs scoring >= 1% of the threshold, which is exact whenever enough boxes
  clear that floor (greedy NMS decides a pair from higher-scoring pairs only); otherwise all pairs run.
* mode 0 returns detections sorted by score and caps at exactly ``max_boxes`` (the original keeps ties at
  the k-th score and orders by class).
* mode 2 with box regression on: the box is the mean of the per-class boxes (what the original computes)
  and indexing is per proposal (the original indexes a per-class box list with proposal indices).
* attribute slots whose probability was filtered to 0 report attribute id 0 (``__no_attribute__``); the
  original reports arbitrary top-k indices there.
* images are resized as uint8 tensors with torchvision's antialiased bilinear (the original: PIL bilinear;
  they differ by at most a grey level); degenerate sizes are guarded (long side never above ``max_size``,
  short side >= 1 px) and the batch is zero-padded to at least ``min_input_side`` px, so 1x1 images run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import nms
from torchvision.transforms.v2 import functional as TF

from mmf_plugins.modules.roi_features import (
    ResNetC4Trunk,
    RoIFeatureExtractor,
    frozen_batch_norm,
)

logger = logging.getLogger(__name__)

NMS_FILTER_MODES = {0: "per_class", 1: "best_class", 2: "class_agnostic"}


@dataclass
class VinVLDetectorConfig:
    """Test-time configuration; defaults = sgg_configs/vgattr/vinvl_x152c4.yaml + maskrcnn-benchmark defaults."""

    # backbone: R-152-C4, ResNeXt 32x8d, STRIDE_IN_1X1 False
    stage_blocks: tuple[int, int, int, int] = (3, 8, 36, 3)
    num_groups: int = 32
    width_per_group: int = 8
    # heads
    num_classes: int = 1595  # 1594 VG objects + background
    num_attributes: int = 525  # 524 VG attributes + no-attribute
    cls_embedding_dim: int = 256
    attr_hidden_dim: int = 512
    # RPN
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_stride: int = 16
    pre_nms_top_n: int = 6000
    post_nms_top_n: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: int = 0
    # box head
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    ignore_box_regression: bool = True  # TEST.IGNORE_BOX_REGRESSION of the feature-extraction command
    # input
    min_size: int = 600
    max_size: int = 1000
    min_input_side: int = 32
    pixel_mean_bgr: tuple[float, float, float] = (103.530, 116.280, 123.675)
    # post-processing
    nms_filter: int = 2
    score_thresh: float = 0.2
    nms_thresh: float = 0.5  # MODEL.ROI_HEADS.NMS (modes 0 and 2)
    best_class_nms_thresh: float = 0.3  # hard-coded in the original mode 1
    min_boxes: int = 10
    max_boxes: int = 100
    # attributes
    attribute_on: bool = True
    attr_thresh: float = 0.05
    max_attr_per_obj: int = 16
    max_attr_per_img: int = 100
    # memory
    roi_chunk_size: int = 512
    # NHWC convolutions (trunk, RPN, res5 head); not in the original. One CPU thread, a ResNeXt 32x8d res4 block at
    # 38x63: 66 % -> 80 % of the fp32 matmul peak (grouped 3x3: 70 -> 88 %); same results up to float rounding
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.nms_filter not in NMS_FILTER_MODES:
            raise ValueError(
                f"nms_filter must be one of {sorted(NMS_FILTER_MODES)} "
                f"({', '.join(f'{k}={v}' for k, v in NMS_FILTER_MODES.items())}), got {self.nms_filter!r}"
            )
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {self.score_thresh}")
        if not (0 <= self.min_boxes <= self.max_boxes and self.max_boxes >= 1):
            raise ValueError(
                f"need 0 <= min_boxes <= max_boxes and max_boxes >= 1, got min_boxes={self.min_boxes}, "
                f"max_boxes={self.max_boxes}"
            )
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        if self.pre_nms_top_n < 1 or self.post_nms_top_n < 1:
            raise ValueError(
                f"pre_nms_top_n and post_nms_top_n must be >= 1, got {self.pre_nms_top_n}, {self.post_nms_top_n}"
            )


# ----------------------------------------------------------------------------------------- boxes
def legacy_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Detectron ``generate_anchors``: (len(ratios) * len(sizes), 4) xyxy anchors around (stride-1)/2.

    Ratio-major order (for each ratio, every size), rounded widths as in the original (numpy round = half to even).
    """
    base = float(stride)
    ctr = 0.5 * (base - 1.0)
    rows = []
    for ratio in aspect_ratios:  # 3 ratios x 5 sizes at model build time, not a hot path
        w = float(round(math.sqrt(base * base / ratio)))
        h = float(round(w * ratio))
        for size in sizes:
            scale = size / base
            ws, hs = w * scale, h * scale
            rows.append([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)])
    return torch.tensor(rows, dtype=torch.float32)


def decode_boxes(
    deltas: torch.Tensor,
    reference: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = math.log(1000.0 / 16),
) -> torch.Tensor:
    """maskrcnn-benchmark ``BoxCoder.decode`` (legacy +1 widths): deltas (N, 4k), boxes (N, 4) -> (N, 4k)."""
    reference = reference.to(deltas.dtype)
    widths = reference[:, 2] - reference[:, 0] + 1
    heights = reference[:, 3] - reference[:, 1] + 1
    ctr_x = reference[:, 0] + 0.5 * widths
    ctr_y = reference[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=clip)
    dh = (deltas[:, 3::4] / wh).clamp(max=clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack(
        (pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w - 1, pred_ctr_y + 0.5 * pred_h - 1),
        dim=2,
    )
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``BoxList.clip_to_image``: x in [0, W-1], y in [0, H-1] (any leading shape, last dim 4)."""
    x = boxes[..., 0::2].clamp(0, width - 1)
    y = boxes[..., 1::2].clamp(0, height - 1)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every pair within the last-but-one dim: (..., N, 4) -> (..., N, N); same formula as torchvision nms."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[..., :, None] + area[..., None, :] - inter)


# --------------------------------------------------------------------------------- NMS filters
_BITS = 32  # bits used per int64 word (keeps every word non-negative)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., N) bool -> (..., ceil(N/32)) int64 bitmask."""
    n = mask.shape[-1]
    words = (n + _BITS - 1) // _BITS
    padded = F.pad(mask.to(torch.int64), (0, words * _BITS - n))
    shifts = torch.arange(_BITS, device=mask.device, dtype=torch.int64)
    return (padded.view(*mask.shape[:-1], words, _BITS) << shifts).sum(-1)


def _unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(_BITS, device=bits.device, dtype=torch.int64)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :n]


def batched_class_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    valid: torch.Tensor | None = None,
    max_iou_bytes: int = 64 << 20,
) -> torch.Tensor:
    """Greedy NMS run separately for every class, all classes at once.

    ``boxes``: (N, 4) shared by all classes or (N, C, 4) per class; ``scores``: (N, C); ``valid``: (N, C) bool,
    pairs that take part (the others neither survive nor suppress). Returns ``keep`` (N, C) bool: the pairs that
    ``torchvision.ops.nms`` keeps when run on each class's valid pairs (suppress when IoU > threshold).

    How: each class gets a bitmask of suppressed boxes; one loop over score ranks visits, for every class at
    once, its next box, and ORs that box's overlap row into the class mask if the box is still alive. Work is
    O(C * N * N / 32) integer ops with no Python loop over classes.
    """
    n, c = scores.shape
    keep = torch.zeros((n, c), dtype=torch.bool, device=scores.device)
    if n == 0 or c == 0:
        return keep
    if valid is None:
        valid = torch.ones((n, c), dtype=torch.bool, device=scores.device)
    classes = valid.any(dim=0).nonzero().squeeze(1)
    if classes.numel() == 0:
        return keep
    cv = valid[:, classes].t()  # (C', N)
    cs = scores[:, classes].t().float().masked_fill(~cv, float("-inf"))
    order = cs.argsort(dim=1, descending=True, stable=True)  # (C', N) box index by rank
    rounds = int(cv.sum(dim=1).max())
    num_cls = classes.numel()

    order_t = order.t().contiguous()  # (N, C'): row r = every class's box at rank r
    word_t, shift_t = order_t // _BITS, order_t % _BITS
    if boxes.dim() == 2:
        over = pairwise_iou(boxes.float()) > iou_threshold
        over.fill_diagonal_(False)
        over_rows = _pack_bits(over)  # (N, W): bitmask of the boxes each box suppresses
        row_t = order_t
    else:
        per_class = boxes[:, classes].float().transpose(0, 1)  # (C', N, 4)
        chunk = max(1, max_iou_bytes // max(1, n * n * 4))
        eye = torch.eye(n, dtype=torch.bool, device=boxes.device)
        over_rows = torch.cat(
            [
                _pack_bits((pairwise_iou(per_class[s : s + chunk]) > iou_threshold) & ~eye)
                for s in range(0, num_cls, chunk)  # chunks bound memory; each chunk covers many classes
            ],
            dim=0,
        ).reshape(num_cls * n, -1)  # (C' * N, W)
        row_t = order_t + torch.arange(num_cls, device=scores.device)[None] * n

    suppressed = _pack_bits(~cv)  # (C', W); invalid pairs start suppressed: never alive, never suppress
    for r in range(rounds):  # loop over score ranks (<= N); every class advances together
        current = suppressed.gather(1, word_t[r][:, None]).squeeze(1)
        alive = ((current >> shift_t[r]) & 1) ^ 1  # 1 where this class's rank-r box is not suppressed
        suppressed |= over_rows.index_select(0, row_t[r]) * alive[:, None]
    keep_cls = ~_unpack_bits(suppressed, n)  # (C', N)
    keep[:, classes] = keep_cls.t()
    return keep


@dataclass
class Detections:
    """Kept detections of one image: proposal ``index``, class ``labels``, ``scores``, ``boxes`` (K, 4)."""

    index: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


def _class_boxes(boxes: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return boxes[index] if boxes.dim() == 2 else boxes[index, labels]


def _clamp_count(num_above: int, available: int, min_boxes: int, max_boxes: int) -> int:
    return min(max(num_above, min_boxes), max_boxes, available)


def filter_per_class(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_thresh: float,
    nms_thresh: float,
    min_boxes: int,
    max_boxes: int,
    max_retries: int = 10,
) -> Detections:
    """Mode 0: maskrcnn-benchmark ``filter_results`` (+ the threshold-halving retry for ``min_boxes``).

    ``boxes`` (N, 4) or (N, C, 4); ``scores`` (N, C) softmax including background column 0.
    """
    fg = scores[:, 1:]
    fg_boxes = boxes if boxes.dim() == 2 else boxes[:, 1:]
    thresh = score_thresh
    for attempt in range(max_retries + 1):  # at most 11 passes over the threshold, never over classes
        keep = batched_class_nms(fg_boxes, fg, nms_thresh, valid=fg > thresh)
        rows, cols = keep.nonzero(as_tuple=True)
        if rows.numel() >= min_boxes or attempt == max_retries:
            break
        thresh /= 2.0
    kept_scores = fg[rows, cols]
    order = kept_scores.argsort(descending=True, stable=True)[:max_boxes]
    index, labels = rows[order], cols[order] + 1
    return Detections(index, labels, kept_scores[order], _class_boxes(boxes, index, labels))


def filter_best_class(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_thresh: float,
    min_boxes: int,
    max_boxes: int,
    nms_thresh: float = 0.3,
    prefilter: float = 0.01,
) -> Detections:
    """Mode 1 ("Peter Anderson"): per-class NMS over all (box, class) pairs; each box keeps its best
    surviving class; keep boxes with score >= thresh, at least ``min_boxes`` and at most ``max_boxes``.

    Exact shortcut: greedy NMS decides a pair only from higher-scoring pairs of its class, so running it on the
    pairs scoring >= ``prefilter * score_thresh`` gives every box whose best surviving score is above that floor
    exactly (the others come out as 0). When at least as many boxes as will be kept clear the floor, the result
    is the original's; otherwise (flat class distributions) all pairs are run.
    """
    fg = scores[:, 1:]
    fg_boxes = boxes if boxes.dim() == 2 else boxes[:, 1:]
    floor = score_thresh * prefilter
    for valid in (fg >= floor, None) if floor > 0 else (None,):  # at most two passes
        best, labels = (fg * batched_class_nms(fg_boxes, fg, nms_thresh, valid=valid)).max(dim=1)
        cand = (best > 0).nonzero().squeeze(1)
        wanted = min(max(int((best[cand] >= score_thresh).sum()), min_boxes), max_boxes)
        if cand.numel() >= wanted:
            break
    cand = cand[best[cand].argsort(descending=True, stable=True)]
    index = cand[: min(wanted, cand.numel())]
    labels = labels[index] + 1
    return Detections(index, labels, best[index], _class_boxes(boxes, index, labels))


def filter_class_agnostic(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_thresh: float,
    nms_thresh: float,
    min_boxes: int,
    max_boxes: int,
) -> Detections:
    """Mode 2 (``filter_results_fast``): best foreground class per box, one NMS over boxes, keep score >= thresh
    clamped to [min_boxes, max_boxes]; a loose pre-threshold (1% of thresh) bounds the NMS input."""
    best, labels = scores[:, 1:].max(dim=1)
    labels = labels + 1
    # NOTE(parity): with class-specific regression the original averages the boxes of ALL classes (incl. bg)
    box = boxes if boxes.dim() == 2 else boxes.mean(dim=1)
    w = box[:, 2] - box[:, 0]
    h = box[:, 3] - box[:, 1]
    cand = ((w >= 0) & (h >= 0) & (best > score_thresh * 0.01)).nonzero().squeeze(1)
    index = cand[nms(box[cand].float(), best[cand].float(), nms_thresh)]  # sorted by decreasing score
    k = _clamp_count(int((best[index] >= score_thresh).sum()), index.numel(), min_boxes, max_boxes)
    index = index[:k]
    return Detections(index, labels[index], best[index], box[index])


def filter_detections(boxes: torch.Tensor, scores: torch.Tensor, config: VinVLDetectorConfig) -> Detections:
    """Apply ``config.nms_filter`` (0, 1 or 2) to one image's boxes and class probabilities."""
    common = {"score_thresh": config.score_thresh, "min_boxes": config.min_boxes, "max_boxes": config.max_boxes}
    if config.nms_filter == 0:
        return filter_per_class(boxes, scores, nms_thresh=config.nms_thresh, **common)
    if config.nms_filter == 1:
        return filter_best_class(boxes, scores, nms_thresh=config.best_class_nms_thresh, **common)
    return filter_class_agnostic(boxes, scores, nms_thresh=config.nms_thresh, **common)


def select_attributes(
    probs: torch.Tensor, *, thresh: float, max_per_obj: int, max_per_img: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``AttributePostProcessor.filter_results`` for one image: probs (K, A) softmax -> (labels, scores) (K, m).

    Column 0 (no-attribute) is dropped, probabilities <= thresh are zeroed, at most ``max_per_img`` non-zero
    entries are kept per image, then the top ``max_per_obj`` per object. Zero-score slots get label 0.
    """
    probs = probs.float().clone()
    probs[:, 0] = 0.0
    probs = probs * (probs > thresh)
    nonzero = int((probs > 0).sum())
    if max_per_img > 0 and nonzero > max_per_img:
        kth = probs.flatten().topk(max_per_img).values[-1]
        probs = probs * (probs >= kth)
    k = min(max_per_obj, probs.shape[1])
    scores, labels = probs.topk(k, dim=1)
    labels = labels.masked_fill(scores <= 0, 0)
    return labels, scores


# ----------------------------------------------------------------------------------------- modules
class AnchorGenerator(nn.Module):
    """Single-level anchors: ``cell_anchors`` (A, 4) shifted over the stride-16 grid, order (y, x, anchor)."""

    def __init__(self, sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int):
        super().__init__()
        self.stride = int(stride)
        self.register_buffer("cell_anchors", legacy_cell_anchors(stride, sizes, aspect_ratios))

    @property
    def num_anchors(self) -> int:
        return int(self.cell_anchors.shape[0])

    def forward(self, height: int, width: int) -> torch.Tensor:
        dev = self.cell_anchors.device
        shift_y, shift_x = torch.meshgrid(
            torch.arange(height, device=dev, dtype=torch.float32) * self.stride,
            torch.arange(width, device=dev, dtype=torch.float32) * self.stride,
            indexing="ij",
        )
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (A) and box deltas (4A) convs."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)


class RegionProposalNetwork(nn.Module):
    """Test-time RPN: top ``pre_nms_top_n`` anchors by objectness -> decode -> clip -> NMS -> top ``post_nms_top_n``."""

    def __init__(self, config: VinVLDetectorConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.aspect_ratios, config.anchor_stride)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors)

    def forward(self, c4: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        cfg = self.config
        logits, deltas = self.head(c4)
        b, a, h, w = logits.shape
        objectness = logits.float().permute(0, 2, 3, 1).reshape(b, -1).sigmoid()  # (B, H*W*A)
        deltas = deltas.float().view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        anchors = self.anchor_generator(h, w)
        k = min(cfg.pre_nms_top_n, objectness.shape[1])
        top_scores, top_idx = objectness.topk(k, dim=1, sorted=True)
        proposals = []
        for i, (img_h, img_w) in enumerate(image_sizes):  # loop over the images of the batch
            boxes = decode_boxes(deltas[i, top_idx[i]], anchors[top_idx[i]])
            boxes = clip_boxes(boxes, img_h, img_w)
            scores = top_scores[i]
            if cfg.rpn_min_size > 0:
                ws = boxes[:, 2] - boxes[:, 0] + 1
                hs = boxes[:, 3] - boxes[:, 1] + 1
                big = (ws >= cfg.rpn_min_size) & (hs >= cfg.rpn_min_size)
                boxes, scores = boxes[big], scores[big]
            keep = nms(boxes, scores, cfg.rpn_nms_thresh)[: cfg.post_nms_top_n]
            proposals.append(boxes[keep])
        return proposals


class BoxPredictor(nn.Module):
    """FastRCNNPredictor on the pooled feature: ``cls_score`` (C) and class-specific ``bbox_pred`` (4C)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)


class BoxHead(nn.Module):
    def __init__(self, feature_extractor: RoIFeatureExtractor, num_classes: int):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.predictor = BoxPredictor(feature_extractor.out_channels, num_classes)


class AttributePredictor(nn.Module):
    """AttributeRCNNPredictor: [feature || cls_embedding(label)] -> fc_attr + ReLU -> attr_score
    (``hidden_dim=0``: no fc_attr, the shapes detector's linear head)."""

    def __init__(self, in_channels: int, num_classes: int, num_attributes: int, embedding_dim: int, hidden_dim: int,
                 init_std: float | None = 0.01):
        """``init_std``: the official normal(0, 0.01) init of both layers; ``None`` keeps PyTorch's default
        (kaiming-uniform) linear init, whose gradients reach the shared box feature from the first step."""
        super().__init__()
        self.cls_embedding = nn.Embedding(num_classes, embedding_dim)
        # hidden_dim 0: no hidden layer, the scores are linear in [feature || class embedding] (not in VinVL)
        self.fc_attr = nn.Linear(in_channels + embedding_dim, hidden_dim) if hidden_dim else None
        self.attr_score = nn.Linear(hidden_dim or in_channels + embedding_dim, num_attributes)
        nn.init.normal_(self.cls_embedding.weight, std=0.01)
        if init_std is not None:
            for layer in (self.fc_attr, self.attr_score):
                if layer is not None:
                    nn.init.normal_(layer.weight, std=init_std)
                    nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pooled, self.cls_embedding(labels).to(pooled.dtype)], dim=1)
        return self.attr_score(F.relu(self.fc_attr(x)) if self.fc_attr is not None else x)


class AttributeHead(nn.Module):
    """Shares the box feature extractor (SHARE_BOX_FEATURE_EXTRACTOR=True), so its keys appear twice in the
    state dict, as in the official checkpoint."""

    def __init__(self, feature_extractor: RoIFeatureExtractor, predictor: AttributePredictor):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.predictor = predictor


class C4Backbone(nn.Module):
    def __init__(self, body: ResNetC4Trunk):
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def resize_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn-benchmark ``Resize.get_size`` (short side ``min_size``, long side <= ``max_size``), with guards
    for degenerate aspect ratios: sides >= 1 and the long side never above ``max_size``."""
    size = float(min_size)
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = float(round(max_size * short / long))
    size = max(size, 1.0)
    if (width <= height and width == size) or (height <= width and height == size):
        oh, ow = height, width
    elif width < height:
        ow, oh = int(size), int(size * height / width)
    else:
        oh, ow = int(size), int(size * width / height)
    if max(oh, ow) > max_size:  # only for extreme ratios, where rounding left the long side too big
        scale = max_size / max(oh, ow)
        oh, ow = max(1, int(oh * scale)), max(1, int(ow * scale))
    return max(1, oh), max(1, ow)


class VinVLX152C4(nn.Module):
    """The VinVL detector. ``forward(images, boxes=None) -> list[record]`` (one feature record per image).

    ``images``: list of uint8 RGB tensors (3, H, W) of any size; ``boxes``: optional list of (N_i, 4) xyxy boxes
    in original pixels: features are then pooled for these boxes (no RPN, no NMS; label = best foreground class).
    Records hold tensors on the model's device; ``bbox`` is in original-image pixels.
    """

    def __init__(self, config: VinVLDetectorConfig | None = None, **overrides):
        super().__init__()
        cfg = config or VinVLDetectorConfig()
        if overrides:
            known = {f.name for f in dataclasses.fields(cfg)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"unknown VinVL detector option(s) {unknown}; known: {', '.join(sorted(known))}")
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg
        resnet = ResNet(
            Bottleneck,
            list(cfg.stage_blocks),
            groups=cfg.num_groups,
            width_per_group=cfg.width_per_group,
            norm_layer=frozen_batch_norm(0.0),  # NOTE(parity): maskrcnn FrozenBatchNorm2d has no eps
        )
        self.backbone = C4Backbone(ResNetC4Trunk.from_torchvision(resnet))
        self.rpn = RegionProposalNetwork(cfg, self.backbone.body.out_channels)
        extractor = RoIFeatureExtractor(
            resnet.layer4,
            output_size=cfg.pooler_resolution,
            spatial_scale=1.0 / cfg.anchor_stride,
            sampling_ratio=cfg.pooler_sampling_ratio,
            aligned=False,
            roi_chunk_size=cfg.roi_chunk_size,
        )
        self.roi_heads = nn.ModuleDict({"box": BoxHead(extractor, cfg.num_classes)})
        if cfg.attribute_on:
            predictor = AttributePredictor(
                extractor.out_channels, cfg.num_classes, cfg.num_attributes, cfg.cls_embedding_dim, cfg.attr_hidden_dim
            )
            self.attribute = AttributeHead(extractor, predictor)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean_bgr).view(3, 1, 1), persistent=False)
        self.object_names: list[str] | None = None
        self.attribute_names: list[str] | None = None
        if cfg.channels_last:  # 4-d weights NHWC; load_state_dict copies into them and keeps the layout
            self.to(memory_format=torch.channels_last)
        self.eval()

    # ------------------------------------------------------------------ labels
    def set_labelmap(self, object_names: Sequence[str] | None, attribute_names: Sequence[str] | None = None) -> None:
        """Names indexed by class id (0 = background) and attribute id (0 = no attribute)."""
        if object_names is not None and len(object_names) != self.config.num_classes:
            raise ValueError(
                f"labelmap has {len(object_names)} object names (with background) but the detector has "
                f"{self.config.num_classes} classes; use the labelmap that came with the checkpoint"
            )
        if attribute_names is not None and len(attribute_names) != self.config.num_attributes:
            raise ValueError(
                f"labelmap has {len(attribute_names)} attribute names (with no-attribute) but the detector has "
                f"{self.config.num_attributes} attributes; use the labelmap that came with the checkpoint"
            )
        self.object_names = list(object_names) if object_names is not None else None
        self.attribute_names = list(attribute_names) if attribute_names is not None else None

    def object_name(self, class_id: int) -> str:
        return self.object_names[class_id] if self.object_names else f"class_{class_id}"

    def attribute_name(self, attr_id: int) -> str:
        return self.attribute_names[attr_id] if self.attribute_names else f"attribute_{attr_id}"

    # ------------------------------------------------------------------ input
    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """uint8 RGB (3, H, W) list -> zero-padded BGR-minus-mean batch (B, 3, Hmax, Wmax) and resized sizes."""
        cfg = self.config
        device = self.pixel_mean.device
        resized, sizes = [], []
        for i, img in enumerate(images):  # loop over the images of a batch
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"image {i}: expected a uint8 tensor (3, H, W) in RGB, got "
                    f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}"
                )
            h, w = int(img.shape[1]), int(img.shape[2])
            if h < 1 or w < 1:
                raise ValueError(f"image {i} is empty ({h}x{w} pixels)")
            oh, ow = resize_size(h, w, cfg.min_size, cfg.max_size)
            x = img.to(device, non_blocking=True)
            if (oh, ow) != (h, w):
                x = TF.resize(x, [oh, ow], antialias=True)
            x = x.flip(0).float() - self.pixel_mean  # RGB -> BGR, 0-255, minus PIXEL_MEAN (std 1)
            resized.append(x)
            sizes.append((oh, ow))
        max_h = max(cfg.min_input_side, max(s[0] for s in sizes))
        max_w = max(cfg.min_input_side, max(s[1] for s in sizes))
        batch = resized[0].new_zeros((len(resized), 3, max_h, max_w))
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return batch, sizes

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor] | None = None) -> list[dict]:
        cfg = self.config
        if len(images) == 0:
            return []
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; pass one (N, 4) tensor per image")
        originals = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        batch, sizes = self.preprocess(images)
        if cfg.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        c4 = self.backbone(batch)
        if boxes is None:
            proposals = self.rpn(c4, sizes)
        else:
            proposals = [
                _scale_boxes(b.to(c4.device, torch.float32).reshape(-1, 4), oh / h, ow / w)
                for b, (h, w), (oh, ow) in zip(boxes, originals, sizes)
            ]
        box_head = self.roi_heads["box"]
        pooled = box_head.feature_extractor(c4, proposals).float()
        logits = box_head.predictor.cls_score(pooled).float()
        deltas = None
        if boxes is None and not cfg.ignore_box_regression:
            deltas = box_head.predictor.bbox_pred(pooled).float()

        counts = [int(p.shape[0]) for p in proposals]
        dets: list[Detections] = []
        for i, (props, probs) in enumerate(zip(proposals, F.softmax(logits, dim=-1).split(counts))):
            oh, ow = sizes[i]
            if boxes is not None:  # given boxes: keep all, label = best foreground class
                best, labels = probs[:, 1:].max(dim=1)
                idx = torch.arange(props.shape[0], device=props.device)
                dets.append(Detections(idx, labels + 1, best, props))
                continue
            if deltas is None:
                cand_boxes = props
            else:
                d = deltas[sum(counts[:i]) : sum(counts[: i + 1])]
                cand_boxes = clip_boxes(decode_boxes(d, props, cfg.bbox_reg_weights).view(-1, cfg.num_classes, 4), oh, ow)
            dets.append(filter_detections(cand_boxes, probs, cfg))

        offsets = torch.tensor([0] + counts[:-1], device=pooled.device).cumsum(0)
        flat_index = torch.cat([d.index + offsets[i] for i, d in enumerate(dets)])
        feats = pooled[flat_index]
        cls_prob = F.softmax(logits[flat_index], dim=-1)
        attrs = None
        if cfg.attribute_on and flat_index.numel() > 0:
            attr_feats = feats
            if deltas is not None:  # final boxes differ from the proposals: pool them again (as the original)
                attr_feats = self.attribute.feature_extractor(c4, [d.boxes for d in dets]).float()
            labels = torch.cat([d.labels for d in dets])
            attrs = F.softmax(self.attribute.predictor(attr_feats, labels).float(), dim=-1)

        records, start = [], 0
        for i, det in enumerate(dets):
            n = len(det)
            sl = slice(start, start + n)
            start += n
            (h, w), (oh, ow) = originals[i], sizes[i]
            record = {
                "features": feats[sl],
                "bbox": _scale_boxes(det.boxes.float(), h / oh, w / ow),
                "num_boxes": n,
                "image_width": w,
                "image_height": h,
                "objects": det.labels.long(),
                "object_names": [self.object_name(c) for c in det.labels.tolist()],
                "scores": det.scores.float(),
                "cls_prob": cls_prob[sl],
            }
            if cfg.attribute_on:
                if attrs is not None and n > 0:
                    a_labels, a_scores = select_attributes(
                        attrs[sl], thresh=cfg.attr_thresh, max_per_obj=cfg.max_attr_per_obj, max_per_img=cfg.max_attr_per_img
                    )
                else:
                    k = min(cfg.max_attr_per_obj, cfg.num_attributes)
                    a_labels = torch.zeros((n, k), dtype=torch.long, device=feats.device)
                    a_scores = torch.zeros((n, k), dtype=torch.float32, device=feats.device)
                record["attributes"] = a_labels
                record["attr_scores"] = a_scores
                record["attribute_names"] = [
                    [self.attribute_name(a) for a, s in zip(lab, sc) if s > 0]
                    for lab, sc in zip(a_labels.tolist(), a_scores.tolist())
                ]
            records.append(record)
        return records


def _scale_boxes(boxes: torch.Tensor, scale_y: float, scale_x: float) -> torch.Tensor:
    return boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])


def oscar_features(record: dict) -> torch.Tensor:
    """The 2054-d OSCAR/VinVL region feature: ``features (N, 2048) || [x1/W, y1/H, x2/W, y2/H, w/W, h/H]``
    (the box dims from ``mmf_plugins.processors.bbox_processors.oscar_box_features``)."""
    from mmf_plugins.processors.bbox_processors import oscar_box_features

    feats = torch.as_tensor(record["features"], dtype=torch.float32)
    bbox = torch.as_tensor(record["bbox"], dtype=torch.float32).reshape(-1, 4)
    if feats.shape[0] != bbox.shape[0]:
        raise ValueError(f"record has {feats.shape[0]} features but {bbox.shape[0]} boxes; expected one box per feature")
    return torch.cat([feats, oscar_box_features(bbox, record["image_width"], record["image_height"])], dim=1)
