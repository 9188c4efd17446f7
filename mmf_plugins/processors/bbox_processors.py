"""Region-box processing for the region-feature models: OSCAR 6-d box features, VL-BERT boxes and
geometry embedding, and the ``bbox`` processor that pads detector records to a fixed region count.

* ``oscar_box_features``: the 6 numbers VinVL/Oscar append to each 2048-d RoI feature (2054-d
  inputs): ``[x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H]`` (microsoft/Oscar issue #10; VinVL
  ``scene_graph_benchmark`` feature dumps).
* ``vl_bert_boxes``: jackroos/VL-BERT ``ADD_IMAGE_AS_A_BOX``: the whole image ``[0, 0, W-1, H-1]``
  as box 0, boxes clamped to the image (``conceptual_captions.py`` / ``vqa.py``).
* ``geometry_embedding``: VL-BERT ``common/utils/bbox.py coordinate_embeddings``: boxes ->
  ``(xc, yc, w, h)`` divided by the image ``(W, H, W, H)`` times 100, divided by
  ``wave_length ** (arange(dim) / dim)``, per coordinate ``sin ‖ cos`` -> ``[N, 4, 2*dim]`` flattened
  to ``[N, 8*dim]`` (coordinate-major: xc's 256 sines, xc's 256 cosines, yc's sines, ...).

The ``bbox`` processor turns a feature record (``features [N, D]``, ``bbox [N, 4]`` xyxy pixels,
``image_width``, ``image_height``, optional per-box ``objects``/``scores``/``cls_prob``/
``attributes``/``attr_scores``/``object_names``/``attribute_names``) into MMF's
``image_feature_0`` / ``image_info_0``, keeping the first ``max_features`` regions and zero-padding
the rest (Oscar ``run_vqa.py``: truncate to ``max_img_seq_length`` or pad with zeros).

As in VL-BERT, the whole-image box feature is the mean over all given boxes, taken before the
truncation to ``max_features``. VL-BERT computes the geometry on the resized image (boxes and
``im_info`` after resizing); the embedding only sees ratios, so original-pixel boxes with the
original size give the same values up to the resize rounding.

Deliberate differences: boxes are not re-sorted (VL-BERT sorts Conceptual Captions boxes by
detector confidence; our feature stores keep the detector's order, already by score).
"""

from __future__ import annotations

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.processors.base_processor import BaseProcessor
from mmf_plugins.processors.text_processors import check_processor_params

BOX_DIMS = 6  # OSCAR's appended box features
PER_BOX_FIELDS = ("objects", "scores", "cls_prob", "attributes", "attr_scores")
PER_BOX_LISTS = ("object_names", "attribute_names")


def _image_size(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _check_boxes(bbox: torch.Tensor) -> torch.Tensor:
    bbox = torch.as_tensor(bbox)
    if bbox.dim() != 2 or bbox.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy pixels, got shape {tuple(bbox.shape)}")
    return bbox.float() if not bbox.is_floating_point() else bbox


def oscar_box_features(bbox: torch.Tensor, image_width, image_height) -> torch.Tensor:
    """``[N, 4]`` xyxy pixels -> ``[N, 6]`` = ``[x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H]``.
    ``image_width``/``image_height``: numbers or tensors broadcastable to ``[N]``."""
    bbox = _check_boxes(bbox)
    w = _image_size(image_width, bbox)
    h = _image_size(image_height, bbox)
    x1, y1, x2, y2 = bbox.unbind(-1)
    return torch.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], dim=-1)


def vl_bert_boxes(bbox: torch.Tensor, image_width, image_height, add_image_box: bool = True,
                  clamp: bool = True) -> torch.Tensor:
    """VL-BERT boxes: clamp to ``[0, W-1] x [0, H-1]`` and (``add_image_box``) prepend the
    whole-image box ``[0, 0, W-1, H-1]`` -> ``[N(+1), 4]``."""
    bbox = _check_boxes(bbox).clone()
    w, h = float(image_width), float(image_height)
    if clamp:
        bbox[:, 0::2] = bbox[:, 0::2].clamp(0, w - 1)
        bbox[:, 1::2] = bbox[:, 1::2].clamp(0, h - 1)
    if add_image_box:
        image_box = bbox.new_tensor([[0.0, 0.0, w - 1.0, h - 1.0]])
        bbox = torch.cat([image_box, bbox], dim=0)
    return bbox


def geometry_embedding(boxes: torch.Tensor, image_width, image_height, dim: int = 256,
                       wave_length: float = 1000.0) -> torch.Tensor:
    """VL-BERT coordinate embedding: ``[N, 4]`` xyxy -> ``[N, 4 * 2 * dim]`` (see module docstring).

    ``image_width``/``image_height``: numbers or ``[N]`` tensors (e.g. per-box image sizes in a batch
    flattened to N boxes)."""
    boxes = _check_boxes(boxes)
    w = _image_size(image_width, boxes)
    h = _image_size(image_height, boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    position = torch.stack(
        [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], dim=-1
    ) * 100.0  # [N, 4]
    div = wave_length ** (torch.arange(dim, dtype=boxes.dtype, device=boxes.device) / dim)
    phase = position.unsqueeze(-1) / div  # [N, 4, dim]
    return torch.cat([phase.sin(), phase.cos()], dim=-1).flatten(1)


def _pad_rows(tensor: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    pad = tensor.new_full((rows - tensor.shape[0], *tensor.shape[1:]), value)
    return torch.cat([tensor, pad], dim=0)


@registry.register_processor("bbox")
class BBoxProcessor(BaseProcessor):
    """Feature record -> ``{"image_feature_0": [M, D'], "image_info_0": {...}}``.

    Params: ``format`` (``oscar`` | ``vl_bert``), ``max_features`` (M; null = keep all N, no padding),
    ``feature_dim`` (2048: the pure RoI feature size), ``append_box_dims`` (oscar only: ``true``
    appends the 6 box dims to ``feature_dim``-d inputs and keeps ``feature_dim + 6``-d inputs as
    they are; ``false`` passes features through unchanged; ``"error"`` raises on ``feature_dim``-d
    inputs), ``add_image_box`` (vl_bert only, true).

    ``image_info_0``: ``bbox`` [M, 4] (vl_bert: image box first), ``num_boxes`` and ``max_features``
    (both the number n of valid rows, the vl_bert image box included; the region mask is
    ``arange(M) < n``), ``image_width``,
    ``image_height``, ``has_image_box``, and the record's per-box fields cut/padded to M (numeric
    ones zero-padded; name lists only cut; the image box gets a zero row / "").
    """

    PARAMS = ("format", "max_features", "feature_dim", "append_box_dims", "add_image_box")

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "bbox")
        self.format = str(self.config.get("format", "oscar"))
        if self.format not in ("oscar", "vl_bert"):
            raise ValueError(f"bbox format must be 'oscar' or 'vl_bert', got {self.format!r}")
        max_features = self.config.get("max_features", None)
        self.max_features = int(max_features) if max_features else None
        self.feature_dim = int(self.config.get("feature_dim", 2048))
        append = self.config.get("append_box_dims", True)
        if append not in (True, False, "error"):
            raise ValueError(f"append_box_dims must be true, false or \"error\", got {append!r}")
        self.append_box_dims = append
        self.add_image_box = bool(self.config.get("add_image_box", True)) and self.format == "vl_bert"

    def _features(self, features: torch.Tensor, bbox: torch.Tensor, width: int, height: int) -> torch.Tensor:
        dim = features.shape[1]
        if self.format == "vl_bert":
            if dim != self.feature_dim:
                raise ValueError(
                    f"vl_bert region features must be {self.feature_dim}-d (pure RoI features), got {dim}-d"
                    + (" (OSCAR's 2048+6 form: read the store without box dims)" if dim == self.feature_dim + BOX_DIMS else "")
                    + "; set params.feature_dim if your detector's features have another size"
                )
            return features
        if self.append_box_dims is False:
            return features
        if dim == self.feature_dim + BOX_DIMS:
            return features
        if dim != self.feature_dim:
            raise ValueError(
                f"oscar region features must be {self.feature_dim}-d (box dims appended here) or "
                f"{self.feature_dim + BOX_DIMS}-d (already appended), got {dim}-d; set params.feature_dim to "
                "the detector's feature size"
            )
        if self.append_box_dims == "error":
            raise ValueError(
                f"oscar region features are {dim}-d but the model expects {dim + BOX_DIMS}-d (feature + 6 box dims); "
                "set append_box_dims: true to append [x1/W, y1/H, x2/W, y2/H, w/W, h/H] from 'bbox'"
            )
        return torch.cat([features, oscar_box_features(bbox, width, height).to(features.dtype)], dim=1)

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        for key in ("features", "bbox", "image_width", "image_height"):
            if key not in item:
                raise KeyError(f"bbox processor expects a feature record with '{key}'; got keys {sorted(item)}")
        features = torch.as_tensor(item["features"])
        if features.dim() != 2:
            raise ValueError(f"'features' must be [N, D], got shape {tuple(features.shape)}")
        features = features.float()
        bbox = _check_boxes(item["bbox"]).float()
        if bbox.shape[0] != features.shape[0]:
            raise ValueError(f"'bbox' has {bbox.shape[0]} boxes but 'features' has {features.shape[0]} rows")
        width, height = int(item["image_width"]), int(item["image_height"])
        if width <= 0 or height <= 0:
            raise ValueError(f"image_width/image_height must be positive, got {width}x{height}")
        features = self._features(features, bbox, width, height)
        per_box = {k: torch.as_tensor(item[k]) for k in PER_BOX_FIELDS if item.get(k, None) is not None}
        lists = {k: list(item[k]) for k in PER_BOX_LISTS if item.get(k, None) is not None}
        if self.format == "vl_bert":
            bbox = vl_bert_boxes(bbox, width, height, add_image_box=self.add_image_box)
            if self.add_image_box:
                image_feature = features.mean(dim=0, keepdim=True) if features.shape[0] else features.new_zeros(1, features.shape[1])
                features = torch.cat([image_feature, features], dim=0)
                per_box = {k: torch.cat([v.new_zeros(1, *v.shape[1:]), v], 0) for k, v in per_box.items()}
                lists = {k: ["" if k == "object_names" else [], *v] for k, v in lists.items()}
        count = features.shape[0] if self.max_features is None else min(features.shape[0], self.max_features)
        rows = count if self.max_features is None else self.max_features
        info = {
            "bbox": _pad_rows(bbox, rows),
            "num_boxes": count,
            "max_features": count,
            "image_width": width,
            "image_height": height,
            "has_image_box": self.add_image_box,
        }
        for key, value in per_box.items():
            info[key] = _pad_rows(value, rows)
        for key, value in lists.items():
            info[key] = value[:count]
        return {"image_feature_0": _pad_rows(features, rows), "image_info_0": info}
