"""Masked-region targets over region features (VL-BERT's masked RoI classification, MVRC).

Follows jackroos/VL-BERT ``pretrain/data/datasets/conceptual_captions.py`` (``random_mask_region``
and the whole-image-box update): every real region is chosen with ``mask_probability`` (0.15); a
chosen region's feature is replaced with probability ``replace_probability`` (0.9; the model adds
its learned ``object_mask_visual_embedding`` there) and kept otherwise; every chosen region is a
target whose label is the detector's soft class distribution (``cls_prob``); the whole-image box
(box 0 when ``image_info_0.has_image_box``) is never chosen and its feature is recomputed as the
mean of the real regions whose feature was not replaced.

Runs after the ``bbox`` processor: input ``{"image_feature_0": [M, D], "image_info_0": {"cls_prob"
[M, C] (or "objects" [M] with ``labels_from: objects``), "num_boxes", "has_image_box"?}}``.

Deliberate differences: rows of ``region_labels`` for regions that are not targets are -1 (the
convention of ``lm_label_ids`` and of ``SampleList`` padding for ``region_labels``) — VL-BERT uses
zero rows; select rows with ``region_mask`` before the soft cross-entropy. The image-box mean is
exact (the official divides by ``n + 1e-5``) and zero when every region is replaced; it is
taken over the regions kept by ``bbox`` (the official, before its sequence truncation).
"""

from __future__ import annotations

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.processors.base_processor import BaseProcessor
from mmf_plugins.processors.text_processors import check_processor_params


@registry.register_processor("region_mask")
class RegionMaskProcessor(BaseProcessor):
    """Params: ``mask_probability`` (0.15), ``replace_probability`` (0.9), ``replace_with``
    (``"zero"`` | ``"keep"`` (leave features, the model replaces them using ``region_replaced``) | a
    number), ``feature_dims`` (null = whole row; e.g. 2048 to leave OSCAR's 6 box dims visible),
    ``labels_from`` (``cls_prob`` | ``objects``), ``num_classes`` (needed for ``objects``: one-hot
    labels), ``recompute_image_box`` (true).

    Returns ``image_feature_0`` (features after replacement, a new tensor), ``region_mask`` (bool
    [M], targets), ``region_replaced`` (bool [M], features replaced; a subset of ``region_mask``),
    ``region_labels`` (float [M, C]: the label distribution on ``region_mask`` rows, -1 elsewhere).
    """

    PARAMS = ("mask_probability", "replace_probability", "replace_with", "feature_dims", "labels_from",
              "num_classes", "recompute_image_box")

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "region_mask")
        self.probability = float(self.config.get("mask_probability", 0.15))
        self.replace_probability = float(self.config.get("replace_probability", 0.9))
        for key, value in (("mask_probability", self.probability), ("replace_probability", self.replace_probability)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"region_mask {key} must be in [0, 1], got {value}")
        replace_with = self.config.get("replace_with", "zero")
        if replace_with not in ("zero", "keep") and not isinstance(replace_with, (int, float)):
            raise ValueError(f"region_mask replace_with must be 'zero', 'keep' or a number, got {replace_with!r}")
        self.replace_with = replace_with
        dims = self.config.get("feature_dims", None)
        self.feature_dims = int(dims) if dims is not None else None
        self.labels_from = str(self.config.get("labels_from", "cls_prob"))
        if self.labels_from not in ("cls_prob", "objects"):
            raise ValueError(f"region_mask labels_from must be 'cls_prob' or 'objects', got {self.labels_from!r}")
        num_classes = self.config.get("num_classes", None)
        self.num_classes = int(num_classes) if num_classes is not None else None
        if self.labels_from == "objects" and not self.num_classes:
            raise ValueError("region_mask labels_from: objects needs params.num_classes (one-hot label size)")
        self.recompute_image_box = bool(self.config.get("recompute_image_box", True))

    def _labels(self, info: dict, rows: int) -> torch.Tensor:
        if self.labels_from == "cls_prob":
            if info.get("cls_prob", None) is None:
                raise KeyError(
                    "region_mask needs image_info_0['cls_prob'] (the detector's class distribution per region, "
                    "'cls_prob' in the feature record); or set labels_from: objects with num_classes"
                )
            labels = torch.as_tensor(info["cls_prob"]).float()
        else:
            if info.get("objects", None) is None:
                raise KeyError("region_mask labels_from: objects needs image_info_0['objects'] (class ids)")
            objects = torch.as_tensor(info["objects"]).long()
            if bool(((objects < 0) | (objects >= self.num_classes)).any()):
                raise ValueError(f"region_mask: object ids outside [0, {self.num_classes}) in {objects.tolist()}")
            labels = torch.nn.functional.one_hot(objects, self.num_classes).float()
        if labels.dim() != 2 or labels.shape[0] != rows:
            raise ValueError(
                f"region_mask: labels must be [{rows}, C] (one row per region of image_feature_0), "
                f"got {tuple(labels.shape)}"
            )
        return labels

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "image_feature_0" not in item or "image_info_0" not in item:
            raise KeyError(
                "region_mask runs after the bbox processor: it expects 'image_feature_0' and 'image_info_0', "
                f"got keys {sorted(item)}"
            )
        features = torch.as_tensor(item["image_feature_0"])
        info = item["image_info_0"]
        rows = features.shape[0]
        count = info.get("num_boxes", None)
        count = rows if count is None else int(count)
        has_image_box = bool(info.get("has_image_box", False))
        labels = self._labels(info, rows)

        real = torch.arange(rows) < count
        if has_image_box and rows:
            real[0] = False
        chosen = real & (torch.rand(rows) < self.probability)
        replaced = chosen & (torch.rand(rows) < self.replace_probability)

        features = features.clone()
        dims = slice(0, self.feature_dims)
        if self.replace_with != "keep" and bool(replaced.any()):
            value = 0.0 if self.replace_with == "zero" else float(self.replace_with)
            features[replaced, dims] = value
        if has_image_box and self.recompute_image_box and rows:
            visible = real & ~replaced
            if bool(visible.any()):
                features[0, dims] = features[visible, dims].mean(dim=0)
            else:
                features[0, dims] = 0.0
        region_labels = torch.where(chosen.unsqueeze(1), labels, torch.full_like(labels, -1.0))
        return {
            "image_feature_0": features,
            "region_mask": chosen,
            "region_replaced": replaced,
            "region_labels": region_labels,
        }
