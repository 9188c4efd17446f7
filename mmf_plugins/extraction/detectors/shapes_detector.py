"""Shapes detector: a small object-attribute Faster R-CNN for the generated ``shapes`` demo corpus.

What it is: the detector whose region features the demo's region baselines (VinVL / OSCAR+, VL-BERT) read
instead of ground-truth boxes. It is the VinVL detector design (Zhang et al., "VinVL: Revisiting Visual
Representations in Vision-Language Models", CVPR 2021; microsoft/scene_graph_benchmark ``AttrRCNN``, see
``vinvl.py`` here) scaled down so that it trains from scratch on two CPU cores in about three minutes
(``shapes_detector_training.py``). Built from torchvision detection pieces (``RegionProposalNetwork``,
``AnchorGenerator``, ``RoIHeads`` with its matcher / sampler / box coder and ``fastrcnn_loss``,
``MultiScaleRoIAlign``, ``FeaturePyramidNetwork``, ``BasicBlock``); the NMS filters are ``vinvl.py``'s.

Pipeline (one batch):
  uint8 RGB -> resize (short side 192, long side <= 480) -> ImageNet mean/std -> zero-pad to /16
  -> narrow ResNet trunk (two stride-2 3x3 convs to 16/32 ch = C2, BasicBlock stages of 64/128 ch = C3/C4 at
     strides 8/16, trainable BatchNorm) -> FPN (P2, P3, P4 at strides 4, 8, 16; 64 channels)
  -> RPN on P3/P4 (anchors 16/23 px on P3, 32/45 px on P4, aspect ratios h/w 1.0 and 1.4: the corpus objects
     are 8-28 % of the short side, 15-54 px after resizing, and between 0.87 and 1.39 tall-to-wide)
  -> RoIAlign 7x7 on P2 for boxes under 32 px, on P3 above (every object spans 4-7 feature cells, as an
     object spans several cells in a standard FPN; pooling from P3/P4 instead loses the shape)
  -> two FC layers -> D-d region feature (D=256)
  -> cls_score (background + 6 shapes) / class-specific bbox_pred -> NMS filter (VinVL modes 0/1/2)
  -> attribute head on the kept boxes (VinVL ``AttributeRCNNPredictor``: class embedding || feature ->
     fc + ReLU -> one score per corpus attribute).

Deliberate differences from VinVL X152-C4:
* backbone and box head: the narrow trunk + FPN + two-FC head above instead of ResNeXt-152 C4 + res5 (an
  FPN region head is far cheaper per box than res5, which matters when training on a CPU);
  region features are D=256-d (``feature_dim``), not 2048-d;
* attribute head loss: multi-label binary cross-entropy (independent sigmoid per attribute, summed over the
  attributes) instead of VinVL's softmax cross-entropy over no-attribute + attributes with the object's attributes
  sharing the target mass: with the softmax loss the box head dropped colour within a 3-minute training (a linear
  probe on the region features read the colour of under half of the objects), the summed sigmoid loss pushes each
  attribute separately. Records give the top ``max_attr_per_obj`` attributes with probability >= ``attr_thresh``
  as corpus attribute ids (1-based), padded with -1 (VinVL pads with 0, its no-attribute id);
* attribute head: linear (``attr_hidden_dim: 0``: scores linear in [feature || class embedding], VinVL has a hidden
  fc + ReLU) with PyTorch's default init (``attr_init_std: 0``, VinVL: N(0, 0.01)) and loss weight 0.2. Through two
  0.01-scale layers almost no attribute gradient reaches the shared region feature early on; a linear head makes the
  attributes linearly readable from the feature, which is what the region models downstream need. 4-minute training,
  val, ground-truth boxes (colour / texture top-1, box AP): hidden 128 + VinVL's init 0.65 / 0.76 / 0.80; default init, 0.5:
  1.00 / 0.99 / 0.72; linear head, weight 0.2: 1.00 / 0.93 / 0.82; VL-BERT shapes VQA on their features (2000
  updates): 59.1 (default init) vs 60.9 (linear). ``attr_hidden_dim: 512, attr_init_std: 0.01`` is VinVL's head;
* the box head also sees the box's colours (RoIAlign ``color_grid`` x ``color_grid`` of the normalised image,
  concatenated to the FPN RoI grid), so colour survives the narrow trunk;
* boxes: by default (``box_regression=True``) each kept box is its best class's regressed box, and the
  feature and attributes are pooled again on that final box, so every feature describes its box exactly
  (scores and ``cls_prob`` stay those of the proposal that produced it); ``box_regression=False`` keeps the
  proposal boxes, as VinVL's ``TEST.IGNORE_BOX_REGRESSION``;
* input normalisation is ImageNet mean/std on RGB (VinVL: BGR minus caffe means).

Weights are a safetensors file with a JSON sidecar (``<weights>.json``: architecture config, label map,
training summary, val AP); ``load_shapes_detector`` reads both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import (
    FeaturePyramidNetwork,
    MultiScaleRoIAlign,
    clip_boxes_to_image,
    roi_align,
)
from torchvision.transforms.v2 import functional as TF

from mmf_plugins.common.registry import registry
from mmf_plugins.extraction.detectors.vinvl import (
    NMS_FILTER_MODES,
    AttributePredictor,
    Detections,
    filter_best_class,
    filter_class_agnostic,
    filter_per_class,
    resize_size,
)
from mmf_plugins.extraction.extractors import FeatureExtractor
from mmf_plugins.zoo.conversion import (
    CheckpointError,
    load_state_dict_with_report,
    load_weights_file,
)

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "mmf_plugins.shapes_detector"
SIDECAR_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = "__background__"
RPN_LEVELS = ("p3", "p4")  # proposals from strides 8 and 16
ROI_LEVELS = ("p2", "p3")  # region features from strides 4 and 8: a 15-54 px object spans 4-7 cells
NO_ATTRIBUTE = "__no_attribute__"


# ------------------------------------------------------------------------------------------ config
@dataclass
class ShapesDetectorConfig:
    """Architecture and input size (what the weights depend on). Defaults: projects/vinvl/configs/detector/shapes.yaml."""

    num_classes: int = 7  # background + 6 shapes
    num_attributes: int = 14  # 2 sizes + 8 colours + 4 textures
    # input
    min_size: int = 192
    max_size: int = 480
    size_divisible: int = 16
    # backbone: stem = two stride-2 3x3 convs (C2, stride 4), then two stride-2 stages of BasicBlocks
    # (C3 stride 8, C4 stride 16); FPN over C2-C4 -> P2, P3, P4 with fpn_channels each
    stem_channels: tuple[int, int] = (16, 32)
    stage_channels: tuple[int, int] = (64, 128)
    stage_blocks: tuple[int, int] = (1, 1)
    fpn_channels: int = 32
    # RPN: one tuple of anchor sizes per FPN level (P3, P4); aspect ratios are height / width
    anchor_sizes: tuple[tuple[int, ...], ...] = ((16, 23), (32, 45))
    aspect_ratios: tuple[float, ...] = (1.0, 1.4)
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 128
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 200
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_thresh: float = 0.7
    # box head
    roi_output_size: int = 7
    roi_sampling_ratio: int = 1  # one bilinear sample per bin: bins are <= 1 feature cell here
    roi_canonical_scale: int = 32  # boxes with sqrt(area) >= this pool from P3, smaller ones from P2
    feature_dim: int = 256
    color_grid: int = 3  # the box head also sees the box's colours on a grid x grid RoIAlign of the image (0: off)
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 64
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # attribute head
    cls_embedding_dim: int = 32
    attr_hidden_dim: int = 0  # 0: linear scores; VinVL: 512 with ReLU
    attr_loss_weight: float = 0.2
    attr_init_std: float = 0.0  # 0: PyTorch's default init of the attribute fc layers; VinVL: normal(0, 0.01)

    def __post_init__(self) -> None:
        self.stem_channels = tuple(int(c) for c in self.stem_channels)
        self.stage_channels = tuple(int(c) for c in self.stage_channels)
        self.stage_blocks = tuple(int(b) for b in self.stage_blocks)
        self.anchor_sizes = tuple(tuple(int(s) for s in level) for level in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        self.bbox_reg_weights = tuple(float(w) for w in self.bbox_reg_weights)
        if len(self.stem_channels) != 2 or len(self.stage_channels) != 2 or len(self.stage_blocks) != 2 or min(self.stage_blocks) < 1:
            raise ValueError(
                f"expected 2 stem convs and 2 stages of >= 1 block (FPN levels at strides 4, 8, 16), got "
                f"stem_channels={self.stem_channels}, stage_channels={self.stage_channels}, stage_blocks={self.stage_blocks}"
            )
        if len(self.anchor_sizes) != 2 or len({len(level) for level in self.anchor_sizes}) != 1:
            raise ValueError(
                f"anchor_sizes must give the same number of sizes for each of the 2 FPN levels (P3, P4), "
                f"got {self.anchor_sizes}"
            )
        if self.num_classes < 2 or self.num_attributes < 1:
            raise ValueError(f"need num_classes >= 2 (with background) and num_attributes >= 1, got "
                             f"{self.num_classes}, {self.num_attributes}")
        if self.color_grid < 0:
            raise ValueError(f"color_grid must be >= 0 (0 turns the box colours off), got {self.color_grid}")
        if self.min_size < 16 or self.max_size < self.min_size:
            raise ValueError(f"need 16 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ShapesDetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown shapes detector option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**dict(options))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists


@dataclass
class ShapesPostprocessConfig:
    """Test-time selection of regions (no effect on the weights).

    ``nms_filter``: 0 per-class NMS, 1 best class after per-class NMS, 2 class-agnostic NMS (VinVL's released
    features; default). Keep the boxes scoring >= ``score_thresh``, at least ``min_boxes`` (the best-scoring
    ones when fewer pass) and at most ``max_boxes``.
    """

    nms_filter: int = 2
    score_thresh: float = 0.5
    nms_thresh: float = 0.5
    best_class_nms_thresh: float = 0.3
    min_boxes: int = 1
    max_boxes: int = 20
    box_regression: bool = True
    attr_thresh: float = 0.5
    max_attr_per_obj: int = 3

    def __post_init__(self) -> None:
        if self.nms_filter not in NMS_FILTER_MODES:
            raise ValueError(
                f"nms_filter must be one of {sorted(NMS_FILTER_MODES)} "
                f"({', '.join(f'{k}={v}' for k, v in NMS_FILTER_MODES.items())}), got {self.nms_filter!r}"
            )
        if not 0.0 <= self.score_thresh <= 1.0 or not 0.0 <= self.attr_thresh <= 1.0:
            raise ValueError(f"score_thresh and attr_thresh must be in [0, 1], got {self.score_thresh}, {self.attr_thresh}")
        if not (0 <= self.min_boxes <= self.max_boxes and self.max_boxes >= 1):
            raise ValueError(
                f"need 0 <= min_boxes <= max_boxes and max_boxes >= 1, got min_boxes={self.min_boxes}, "
                f"max_boxes={self.max_boxes}"
            )
        if self.max_attr_per_obj < 1:
            raise ValueError(f"max_attr_per_obj must be >= 1, got {self.max_attr_per_obj}")

    def replace(self, **changes) -> ShapesPostprocessConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown post-processing option(s) {unknown}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class ShapesLabelmap:
    """Names by class id (0 = background) and attribute id (0 = no attribute), plus the COCO ids they stand for.

    Class id ``i`` is the ``i``-th category of the instances file sorted by id; attribute id ``j`` the ``j``-th
    ``attribute_categories`` entry sorted by id (for the shapes corpus both equal the COCO ids).
    """

    object_names: list[str]
    attribute_names: list[str]
    category_ids: list[int]  # COCO category id of class 1..C-1
    attribute_ids: list[int]  # corpus attribute id of attribute 1..A

    @classmethod
    def from_coco(cls, instances: Mapping[str, Any], where: str = "instances json") -> ShapesLabelmap:
        if not instances.get("categories") or not instances.get("attribute_categories"):
            raise ValueError(
                f"{where} has no 'categories' or no 'attribute_categories'; expected the shapes corpus COCO "
                "instances file (annotations/instances_train.json written by generate_shapes)"
            )
        cats = sorted(instances["categories"], key=lambda c: int(c["id"]))
        attrs = sorted(instances["attribute_categories"], key=lambda a: int(a["id"]))
        return cls(
            object_names=[BACKGROUND] + [str(c["name"]) for c in cats],
            attribute_names=[NO_ATTRIBUTE] + [str(a["name"]) for a in attrs],
            category_ids=[int(c["id"]) for c in cats],
            attribute_ids=[int(a["id"]) for a in attrs],
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesLabelmap:
        try:
            return cls(
                object_names=list(data["object_names"]),
                attribute_names=list(data["attribute_names"]),
                category_ids=[int(i) for i in data["category_ids"]],
                attribute_ids=[int(i) for i in data["attribute_ids"]],
            )
        except KeyError as e:
            raise ValueError(f"label map lacks {e.args[0]!r}; expected object_names, attribute_names, category_ids, "
                             "attribute_ids") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_classes(self) -> int:
        return len(self.object_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names) - 1


# ------------------------------------------------------------------------------------------ modules
def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ShapesBackbone(nn.Module):
    """Narrow ResNet trunk + FPN: images (B, 3, H, W) -> {"p2": stride 4, "p3": stride 8, "p4": stride 16} maps."""

    def __init__(self, cfg: ShapesDetectorConfig):
        super().__init__()
        stem, cin = [], 3
        for cout in cfg.stem_channels:
            stem.append(_conv_bn_relu(cin, cout, 2))
            cin = cout
        self.stem = nn.Sequential(*stem)
        stages = []
        for cout, blocks in zip(cfg.stage_channels, cfg.stage_blocks):
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
            layers = [BasicBlock(cin, cout, stride=2, downsample=down)]
            layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        for m in self.modules():  # the FPN below keeps its own (kaiming-uniform) init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fpn = FeaturePyramidNetwork([cfg.stem_channels[-1], *cfg.stage_channels], cfg.fpn_channels)
        self.out_channels = cfg.fpn_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c2 = self.stem(images)
        c3 = self.stages[0](c2)
        c4 = self.stages[1](c3)
        return self.fpn(OrderedDict([("p2", c2), ("p3", c3), ("p4", c4)]))


class ShapesRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (matching, sampling, ``fastrcnn_loss``) plus VinVL's attribute predictor.

    Training: sampled proposals -> class / box / attribute losses (attributes on foreground samples, with their
    ground-truth class fed to the class embedding, as VinVL). Inference is ``ShapesDetector.detect``.
    """

    def __init__(self, cfg: ShapesDetectorConfig, in_channels: int):
        pool = MultiScaleRoIAlign(
            list(ROI_LEVELS), cfg.roi_output_size, cfg.roi_sampling_ratio,
            canonical_scale=cfg.roi_canonical_scale, canonical_level=3,
        )
        head = TwoMLPHead(in_channels * cfg.roi_output_size**2 + 3 * cfg.color_grid**2, cfg.feature_dim)
        super().__init__(
            pool, head, FastRCNNPredictor(cfg.feature_dim, cfg.num_classes),
            fg_iou_thresh=cfg.box_fg_iou_thresh, bg_iou_thresh=cfg.box_bg_iou_thresh,
            batch_size_per_image=cfg.box_batch_size_per_image, positive_fraction=cfg.box_positive_fraction,
            bbox_reg_weights=cfg.bbox_reg_weights, score_thresh=0.0, nms_thresh=0.5, detections_per_img=100,
        )
        self.attribute_predictor = AttributePredictor(  # one logit per attribute 1..A
            cfg.feature_dim, cfg.num_classes, cfg.num_attributes, cfg.cls_embedding_dim, cfg.attr_hidden_dim,
            init_std=cfg.attr_init_std or None,
        )
        self.attr_loss_weight = cfg.attr_loss_weight
        self.color_grid = cfg.color_grid

    def region_features(self, features: Mapping[str, torch.Tensor], boxes: list[torch.Tensor],
                        image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """(sum N_i, D) features of ``boxes`` (resized-image pixels): the FPN RoIAlign grid, plus the box's
        colours on a ``color_grid`` x ``color_grid`` grid of the normalised image (``features["image"]``)."""
        x = self.box_roi_pool(features, boxes, image_sizes).flatten(1)
        if self.color_grid:
            g = self.color_grid
            colors = roi_align(features["image"], [b.to(features["image"].dtype) for b in boxes], (g, g),
                               spatial_scale=1.0, sampling_ratio=4, aligned=True)
            x = torch.cat([x, colors.flatten(1).to(x.dtype)], dim=1)
        return self.box_head(x)

    def losses(self, features, proposals, image_sizes, targets) -> dict[str, torch.Tensor]:
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.region_features(features, proposals, image_sizes)
        class_logits, box_regression = self.box_predictor(x)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        attr_targets = []
        for t, m in zip(targets, matched_idxs):  # loop over the images of the batch
            a = t["attributes"]
            attr_targets.append(a[m] if a.shape[0] else a.new_zeros((m.shape[0], a.shape[1])))
        labels = torch.cat(labels)
        fg = labels > 0
        attr_logits = self.attribute_predictor(x[fg], labels[fg])
        loss_attr = F.binary_cross_entropy_with_logits(attr_logits.float(), torch.cat(attr_targets)[fg], reduction="sum")
        loss_attr = loss_attr / fg.sum().clamp(min=1)  # summed over attributes, averaged over foreground boxes
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg,
                "loss_attributes": self.attr_loss_weight * loss_attr}


class ShapesDetector(nn.Module):
    """The shapes object-attribute detector.

    ``forward(batch, image_sizes, targets) -> dict of losses`` (training: ``batch`` (B, 3, H, W) from
    ``preprocess``, targets with ``boxes`` (N, 4) resized pixels, ``labels`` (N,) class ids, ``attributes``
    (N, A) multi-hot); ``detect(images, boxes=None) -> list[record]`` (inference on uint8 RGB images).
    """

    def __init__(self, config: ShapesDetectorConfig | None = None, labelmap: ShapesLabelmap | None = None,
                 postprocess: ShapesPostprocessConfig | None = None):
        super().__init__()
        cfg = config or ShapesDetectorConfig()
        if labelmap is not None and (labelmap.num_classes != cfg.num_classes or labelmap.num_attributes != cfg.num_attributes):
            raise ValueError(
                f"label map has {labelmap.num_classes} classes / {labelmap.num_attributes} attributes but the config "
                f"says {cfg.num_classes} / {cfg.num_attributes}; build the config from the label map"
            )
        self.config = cfg
        self.labelmap = labelmap
        self.postprocess = postprocess or ShapesPostprocessConfig()
        self.backbone = ShapesBackbone(cfg)
        anchors = AnchorGenerator(cfg.anchor_sizes, (cfg.aspect_ratios,) * len(cfg.anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(self.backbone.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=cfg.rpn_fg_iou_thresh, bg_iou_thresh=cfg.rpn_bg_iou_thresh,
            batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
            nms_thresh=cfg.rpn_nms_thresh,
        )
        self.roi_heads = ShapesRoIHeads(cfg, self.backbone.out_channels)
        # channels-last convolutions are ~10 % faster on CPU (oneDNN); state dicts are saved contiguous
        self.backbone.to(memory_format=torch.channels_last)
        self.rpn.to(memory_format=torch.channels_last)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0, persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    # ------------------------------------------------------------------ input
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return resize_size(height, width, self.config.min_size, self.config.max_size)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> uint8 (3, h, w) at the detector's input size (antialiased bilinear)."""
        oh, ow = self.resized_size(int(image.shape[1]), int(image.shape[2]))
        if (oh, ow) == tuple(image.shape[1:]):
            return image
        return TF.resize(image, [oh, ow], antialias=True)

    def batch(self, resized: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Already-resized uint8 images -> normalised zero-padded batch (B, 3, H, W) and their (h, w)."""
        d = self.config.size_divisible
        sizes = [(int(x.shape[1]), int(x.shape[2])) for x in resized]
        max_h = max(2 * d, math.ceil(max(s[0] for s in sizes) / d) * d)
        max_w = max(2 * d, math.ceil(max(s[1] for s in sizes) / d) * d)
        out = torch.zeros((len(resized), 3, max_h, max_w), device=self.pixel_mean.device)
        for i, x in enumerate(resized):  # loop over the images of a batch
            x = x.to(self.pixel_mean.device, non_blocking=True).float()
            out[i, :, : x.shape[1], : x.shape[2]] = (x - self.pixel_mean) / self.pixel_std
        return out.contiguous(memory_format=torch.channels_last), sizes

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"image {i}: expected a uint8 tensor (3, H, W) in RGB, got "
                    f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}"
                )
            if min(img.shape[1:]) < 1:
                raise ValueError(f"image {i} is empty ({img.shape[1]}x{img.shape[2]} pixels)")
        return self.batch([self.resize(img.to(self.pixel_mean.device)) for img in images])

    # ------------------------------------------------------------------ training
    @staticmethod
    def _rpn_features(features: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((k, features[k]) for k in RPN_LEVELS)

    def forward(self, batch: torch.Tensor, image_sizes: list[tuple[int, int]], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses for one training batch (see the class docstring)."""
        features = self.backbone(batch)
        features["image"] = batch  # for the box colours
        proposals, rpn_losses = self.rpn(ImageList(batch, image_sizes), self._rpn_features(features), targets)
        losses = self.roi_heads.losses(features, proposals, image_sizes, targets)
        return {**rpn_losses, **losses}

    # ------------------------------------------------------------------ inference
    def _filter(self, boxes: torch.Tensor, probs: torch.Tensor, post: ShapesPostprocessConfig) -> Detections:
        common = {"score_thresh": post.score_thresh, "min_boxes": post.min_boxes, "max_boxes": post.max_boxes}
        if post.nms_filter == 0:
            return filter_per_class(boxes, probs, nms_thresh=post.nms_thresh, **common)
        if post.nms_filter == 1:
            return filter_best_class(boxes, probs, nms_thresh=post.best_class_nms_thresh, **common)
        if boxes.dim() == 3:  # class-agnostic: each proposal is represented by its best class's box
            best = probs[:, 1:].argmax(dim=1) + 1
            boxes = boxes[torch.arange(boxes.shape[0], device=boxes.device), best]
        return filter_class_agnostic(boxes, probs, nms_thresh=post.nms_thresh, **common)

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor] | None = None,
               postprocess: ShapesPostprocessConfig | None = None) -> list[dict]:
        """Feature records for uint8 RGB images (3, H, W). ``boxes``: optional (N_i, 4) xyxy boxes in original
        pixels; their features are pooled as given (no RPN, no NMS; label = best foreground class)."""
        post = postprocess or self.postprocess
        if len(images) == 0:
            return []
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; pass one (N, 4) tensor per image")
        originals = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        batch, sizes = self.preprocess(images)
        features = self.backbone(batch)
        features["image"] = batch  # for the box colours
        if boxes is None:
            proposals, _ = self.rpn(ImageList(batch, sizes), self._rpn_features(features))
        else:
            proposals = [
                b.to(batch.device, torch.float32).reshape(-1, 4) * b.new_tensor([ow / w, oh / h, ow / w, oh / h]).to(batch.device)
                for b, (h, w), (oh, ow) in zip(boxes, originals, sizes)
            ]
        heads = self.roi_heads
        pooled = heads.region_features(features, proposals, sizes).float()
        logits, deltas = heads.box_predictor(pooled)
        probs = F.softmax(logits.float(), dim=-1)
        counts = [int(p.shape[0]) for p in proposals]
        regress = boxes is None and post.box_regression
        if regress:
            decoded = heads.box_coder.decode(deltas.float(), proposals).reshape(-1, self.config.num_classes, 4)
            per_image_boxes = [clip_boxes_to_image(b, s) for b, s in zip(decoded.split(counts), sizes)]
        else:
            per_image_boxes = proposals
        dets: list[Detections] = []
        for props, p in zip(per_image_boxes, probs.split(counts)):  # loop over the images of the batch
            if boxes is not None:
                best, labels = p[:, 1:].max(dim=1)
                dets.append(Detections(torch.arange(p.shape[0], device=p.device), labels + 1, best, props))
            else:
                dets.append(self._filter(props, p, post))
        offsets = [0]
        for c in counts[:-1]:
            offsets.append(offsets[-1] + c)
        flat_index = torch.cat([d.index + o for d, o in zip(dets, offsets)])
        labels = torch.cat([d.labels for d in dets]).long()
        if regress:  # features (and attributes) of the final boxes, not of the proposals they came from
            feats = heads.region_features(features, [d.boxes.float() for d in dets], sizes).float()
        else:
            feats = pooled[flat_index]
        attr_probs = torch.sigmoid(heads.attribute_predictor(feats, labels).float())
        k = min(post.max_attr_per_obj, attr_probs.shape[1])
        attr_scores, attr_index = attr_probs.topk(k, dim=1)
        keep = attr_scores >= post.attr_thresh
        attr_ids = torch.where(keep, attr_index + 1, torch.full_like(attr_index, -1))
        attr_scores = attr_scores * keep
        cls_prob = probs[flat_index]
        return self._records(dets, feats, cls_prob, attr_ids, attr_scores, originals, sizes)

    def _records(self, dets, feats, cls_prob, attr_ids, attr_scores, originals, sizes) -> list[dict]:
        object_names = self.labelmap.object_names if self.labelmap else None
        attribute_names = self.labelmap.attribute_names if self.labelmap else None
        records, start = [], 0
        for det, (h, w), (oh, ow) in zip(dets, originals, sizes):  # loop over the images of the batch
            n = len(det)
            sl = slice(start, start + n)
            start += n
            bbox = det.boxes.float() * det.boxes.new_tensor([w / ow, h / oh, w / ow, h / oh])
            bbox = clip_boxes_to_image(bbox, (h, w))
            labels = det.labels.long()
            ids = attr_ids[sl]
            records.append({
                "features": feats[sl],
                "bbox": bbox,
                "num_boxes": n,
                "image_width": w,
                "image_height": h,
                "objects": labels,
                "object_names": [object_names[c] if object_names else f"class_{c}" for c in labels.tolist()],
                "scores": det.scores.float(),
                "cls_prob": cls_prob[sl],
                "attributes": ids,
                "attr_scores": attr_scores[sl],
                "attribute_names": [
                    [attribute_names[a] if attribute_names else f"attribute_{a}" for a in row if a > 0]
                    for row in ids.tolist()
                ],
            })
        return records


# ------------------------------------------------------------------------------------ weights I/O
def sidecar_path(weights_path: str | os.PathLike) -> Path:
    """``detector.safetensors`` -> ``detector.json`` (config, label map, training summary)."""
    return Path(weights_path).with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_shapes_detector(model: ShapesDetector, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the weights (safetensors) and the JSON sidecar atomically; returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights path {path} must end in .safetensors (the sidecar goes to {sidecar_path(path).name})")
    if model.labelmap is None:
        raise ValueError("the detector has no label map; build it with ShapesDetector(config, labelmap) before saving")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": SIDECAR_FORMAT}))
    write_sidecar(model, path, extra)
    return path


def write_sidecar(model: ShapesDetector, weights_path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    cfg = model.config
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "weights": Path(weights_path).name,
        "config": cfg.to_dict(),
        "labelmap": model.labelmap.to_dict(),
        "feature_dim": cfg.feature_dim,
        "input_size": {"min_size": cfg.min_size, "max_size": cfg.max_size},
        **dict(extra or {}),
    }
    side = sidecar_path(weights_path)
    _atomic_write(side, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"))
    return side


def read_sidecar(weights_path: str | os.PathLike) -> dict:
    side = sidecar_path(weights_path)
    if not side.is_file():
        raise FileNotFoundError(
            f"shapes detector sidecar {side} not found; it is written next to the weights by "
            "tools/train_shapes_detector.py (config and label map) and must stay beside them"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{side} is not valid JSON ({e}); re-run tools/train_shapes_detector.py") from e
    if meta.get("format") != SIDECAR_FORMAT or "config" not in meta or "labelmap" not in meta:
        raise ValueError(f"{side} is not a shapes detector sidecar (format {meta.get('format')!r}, expected "
                         f"{SIDECAR_FORMAT!r} with 'config' and 'labelmap')")
    return meta


def load_shapes_detector(model_file: str | os.PathLike, *, device: str | torch.device = "cpu",
                         postprocess: ShapesPostprocessConfig | None = None) -> ShapesDetector:
    """Build the detector from ``<model_file>`` (safetensors, or a ``.ckpt``/``.pth`` state dict) and its sidecar."""
    meta = read_sidecar(model_file)
    model = ShapesDetector(ShapesDetectorConfig.from_dict(meta["config"]), ShapesLabelmap.from_dict(meta["labelmap"]), postprocess)
    state = load_weights_file(model_file)
    if isinstance(state.get("state_dict"), dict):  # Lightning / MMF checkpoint wrapper
        state = state["state_dict"]
    try:
        load_state_dict_with_report(model, state, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{model_file} does not fit the shapes detector described by {sidecar_path(model_file)}:\n{e}") from e
    return model.to(device).eval()


# -------------------------------------------------------------------------------------- extractor
@registry.register_extractor("shapes_detector")
class ShapesDetectorExtractor(FeatureExtractor):
    """Region features of the shapes detector (D = ``feature_dim`` of the weights, 256 by default), with
    classes, scores, class distribution and attributes.

    ``model_file``: weights written by ``tools/train_shapes_detector.py`` (the ``.json`` sidecar must sit beside
    them). ``nms_filter`` 0/1/2 as VinVL (2, class-agnostic, by default); ``score_thresh``, ``min_boxes``,
    ``max_boxes``: keep boxes scoring >= thresh, at least ``min_boxes`` (top by score), at most ``max_boxes``.
    ``box_regression``: final boxes are the regressed ones (features re-pooled on them); ``False`` keeps proposals.
    Given ``boxes`` replace the RPN proposals.
    """

    boxes = "optional"

    def __init__(
        self,
        *,
        model_file: str | os.PathLike,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        score_thresh: float = 0.5,
        min_boxes: int = 1,
        max_boxes: int = 20,
        nms_filter: int = 2,
        box_regression: bool = True,
        attr_thresh: float = 0.5,
        max_attr_per_obj: int = 3,
    ):
        super().__init__(device=device, precision=precision)
        post = ShapesPostprocessConfig(
            nms_filter=int(nms_filter), score_thresh=float(score_thresh), min_boxes=int(min_boxes),
            max_boxes=int(max_boxes), box_regression=bool(box_regression), attr_thresh=float(attr_thresh),
            max_attr_per_obj=int(max_attr_per_obj),
        )
        self.model = load_shapes_detector(model_file, device=self.device, postprocess=post)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def extract(self, images, boxes):
        return self.model.detect(images, boxes)
