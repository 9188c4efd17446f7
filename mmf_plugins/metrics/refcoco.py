"""RefCOCO-style grounding accuracy: the top-scoring region counts as correct when its IoU with the
referred box is >= 0.5.

Follows jackroos/VL-BERT ``common/metrics/refcoco_metrics.py`` (``RefAccuracy``: the label of the
argmax region, labels being IoU > 0.5 with the ground truth) and the usual RefCOCO protocol (MAttNet,
UNITER: IoU >= 0.5). Deliberate difference: the IoU is computed here from the predicted region's box
(``output["boxes"]``) and ``batch["gt_bbox"]`` when both exist, with the threshold inclusive (the
release's strict ``> 0.5`` differs only at exactly 0.5); otherwise the dataset's per-region
``region_targets`` (1 = IoU >= 0.5) at the argmax are read.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from mmf_plugins.common.registry import registry
from mmf_plugins.metrics.metrics import _CountingMetric


@registry.register_metric("refcoco_accuracy")
class RefCOCOAccuracy(_CountingMetric):
    """Inputs: ``output["scores"]`` (B, R) region scores (padding very negative); either
    ``output["boxes"]`` (B, R, 4) + ``batch["gt_bbox"]`` (B, 4), both xyxy in the same pixels, or
    ``batch["region_targets"]`` (B, R). Params: ``iou_threshold`` (0.5)."""

    name = "refcoco_accuracy"

    def __init__(self, iou_threshold: float = 0.5) -> None:
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"refcoco_accuracy iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)
        super().__init__()

    def update(self, batch, output) -> None:
        scores = self._scores(output)
        if scores.dim() != 2:
            raise ValueError(f"refcoco_accuracy expects region scores (B, R), got shape {tuple(scores.shape)}")
        top = scores.argmax(dim=1)
        rows = torch.arange(scores.size(0))
        if "boxes" in output and "gt_bbox" in batch:
            boxes = output["boxes"].detach().float().cpu()
            gt = torch.as_tensor(batch["gt_bbox"]).detach().float().cpu().view(-1, 4)
            iou = box_iou(boxes[rows, top], gt).diagonal()
            self._add(iou >= self.iou_threshold)
            return
        targets = self._get(batch, "region_targets", "batch",
                            "the refcoco dataset (1 where a region's IoU with the referred box is >= 0.5)")
        targets = torch.as_tensor(targets).detach().float().cpu()
        if targets.shape != scores.shape:
            raise ValueError(f"region_targets {tuple(targets.shape)} do not line up with the scores {tuple(scores.shape)}; "
                             "give gt_bbox and let the model return boxes")
        self._add(targets[rows, top] >= 0.5)
