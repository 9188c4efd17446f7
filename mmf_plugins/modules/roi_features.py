"""RoI features on a ResNet C4 trunk with a C5 head: the Faster R-CNN "C4" box-feature path.

What it is: RoIAlign (14x14 at 1/16) on the res4 map of a ResNet, then res5 (``layer4``) on every
RoI, then a global average pool -> one vector per box (2048-d for bottleneck ResNets).

Follows maskrcnn-benchmark ``ResNet50Conv5ROIFeatureExtractor`` (the box head of the VinVL X152-C4
detector, microsoft/scene_graph_benchmark 8e14944, ``roi_box_feature_extractors.py``) and VL-BERT's
end-to-end ``FastRCNN`` (jackroos/VL-BERT 4373674, ``common/fast_rcnn.py``). Built from torchvision
pieces: ``torchvision.ops.roi_align``, torchvision ResNet stages, ``torchvision.ops.FrozenBatchNorm2d``.

Module names follow maskrcnn-benchmark so checkpoints map with few renames:
``stem.{conv1,bn1}``, ``layer1..layer3`` for the trunk and ``head.layer4`` for the RoI head.

Deliberate differences from the originals:

* RoIs are pooled in chunks of ``roi_chunk_size`` through res5 (same numbers, bounded memory);
* ``aligned`` is a parameter: maskrcnn-benchmark and VinVL use the legacy ``aligned=False``
  RoIAlign (the default here); ``aligned=True`` gives the half-pixel-corrected variant;
* the res5 head may be dilated (``res5_dilation=2``, stride 1 -> 14x14 output) as VL-BERT's e2e mode, or
  strided (``res5_dilation=1``, stride 2 -> 7x7) as maskrcnn-benchmark's C4 head; the pooled vector is the
  mean over the output map in both cases.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, roi_align

# torchvision ResNet constructors that have the C4/C5 layout this module needs.
TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def frozen_batch_norm(eps: float = 1e-5):
    """A ``norm_layer`` factory for torchvision ResNets: BatchNorm with fixed statistics.

    NOTE(parity): maskrcnn-benchmark's FrozenBatchNorm2d has no epsilon (``rsqrt(running_var)``);
    use ``eps=0.0`` for its checkpoints and the torch default 1e-5 for torchvision ones.
    """
    return partial(FrozenBatchNorm2d, eps=eps)


def build_torchvision_resnet(arch: str, *, bn_eps: float = 1e-5, res5_dilation: int = 1) -> nn.Module:
    """A torchvision ResNet/ResNeXt (random init, no download) with frozen BN.

    ``res5_dilation=2`` replaces the stride of ``layer4`` by dilation (C5 at stride 16).
    """
    import torchvision

    if arch not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown backbone '{arch}'; expected one of {', '.join(TORCHVISION_RESNETS)}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"res5_dilation must be 1 (stride-2 res5) or 2 (dilated res5), got {res5_dilation}")
    if res5_dilation == 2 and arch in ("resnet18", "resnet34"):
        raise ValueError(
            f"backbone '{arch}' uses BasicBlocks, which torchvision cannot dilate; use res5_dilation=1 "
            "or a bottleneck ResNet (resnet50, resnet101, ...)"
        )
    return torchvision.models.get_model(
        arch,
        weights=None,
        norm_layer=frozen_batch_norm(bn_eps),
        replace_stride_with_dilation=[False, False, res5_dilation == 2],
    )


class ResNetC4Trunk(nn.Module):
    """ResNet stem + res2..res4: image (B, 3, H, W) -> C4 map (B, C4, ceil(H/16), ceil(W/16))."""

    stride = 16

    def __init__(self, stem: nn.Module, layer1: nn.Module, layer2: nn.Module, layer3: nn.Module):
        super().__init__()
        self.stem = stem
        self.layer1 = layer1
        self.layer2 = layer2
        self.layer3 = layer3
        self.out_channels = _out_channels(layer3)

    @classmethod
    def from_torchvision(cls, resnet: nn.Module) -> ResNetC4Trunk:
        """Reuse the modules of a torchvision ResNet (shares its parameters)."""
        stem = nn.Sequential(
            OrderedDict(conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool)
        )
        return cls(stem, resnet.layer1, resnet.layer2, resnet.layer3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(images))))


class RoIFeatureExtractor(nn.Module):
    """RoIAlign on the C4 map -> ``head.layer4`` -> average pool.

    ``forward(c4, boxes)``: ``c4`` (B, C4, h, w); ``boxes`` a list of B tensors (N_i, 4), xyxy in the
    pixel coordinates of the network input (before the 1/16 scale). Returns (sum N_i, C5) pooled features
    in the order of the concatenated boxes.
    """

    def __init__(
        self,
        layer4: nn.Module,
        *,
        output_size: int = 14,
        spatial_scale: float = 1.0 / 16,
        sampling_ratio: int = 0,
        aligned: bool = False,
        roi_chunk_size: int = 512,
    ):
        super().__init__()
        if output_size < 1 or roi_chunk_size < 1:
            raise ValueError(f"output_size and roi_chunk_size must be >= 1, got {output_size}, {roi_chunk_size}")
        self.head = nn.Sequential(OrderedDict(layer4=layer4))
        self.output_size = int(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.roi_chunk_size = int(roi_chunk_size)
        self.out_channels = _out_channels(layer4)

    def pool(self, c4: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """RoIAlign only: (sum N_i, C4, output_size, output_size), in the dtype of ``c4``.

        Box coordinates stay float32 even under bf16/fp16 autocast (bf16 would round a 600 px coordinate
        to a multiple of 4 px), so the sampling runs in float32 and only the result is cast back.
        """
        boxes = [b.to(device=c4.device, dtype=torch.float32) for b in boxes]
        pooled = roi_align(
            c4.float(),
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )
        return pooled.to(c4.dtype)

    def forward(self, c4: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        num = sum(int(b.shape[0]) for b in boxes)
        if num == 0:
            return c4.new_zeros((0, self.out_channels))
        rois = self.pool(c4, boxes)
        outs = [
            self.head(rois[start : start + self.roi_chunk_size]).mean(dim=(2, 3))
            for start in range(0, num, self.roi_chunk_size)
        ]
        return torch.cat(outs, dim=0)


class ResNetRoIFeatures(nn.Module):
    """A whole C4 + C5-head RoI feature network (``trunk`` + ``box_head``), e.g. VL-BERT's e2e visual path.

    ``forward(images, boxes)``: normalized images (B, 3, H, W) and per-image boxes in input pixels ->
    list of B tensors (N_i, C5).
    """

    def __init__(self, trunk: ResNetC4Trunk, box_head: RoIFeatureExtractor):
        super().__init__()
        self.trunk = trunk
        self.box_head = box_head
        self.out_channels = box_head.out_channels

    @classmethod
    def from_torchvision(
        cls,
        resnet: nn.Module,
        *,
        output_size: int = 14,
        sampling_ratio: int = 0,
        aligned: bool = False,
        roi_chunk_size: int = 512,
    ) -> ResNetRoIFeatures:
        trunk = ResNetC4Trunk.from_torchvision(resnet)
        head = RoIFeatureExtractor(
            resnet.layer4,
            output_size=output_size,
            spatial_scale=1.0 / trunk.stride,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            roi_chunk_size=roi_chunk_size,
        )
        return cls(trunk, head)

    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(boxes) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(boxes)} box lists; pass one (N, 4) tensor per image")
        pooled = self.box_head(self.trunk(images), boxes)
        return list(pooled.split([int(b.shape[0]) for b in boxes], dim=0))


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage (last conv of its last block)."""
    last_conv = None
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            last_conv = m
    if last_conv is None:
        raise ValueError(f"cannot find a Conv2d in {type(stage).__name__}; expected a ResNet stage")
    # the downsample conv comes after conv3 in module order; both have the stage's output width
    return int(last_conv.out_channels)
