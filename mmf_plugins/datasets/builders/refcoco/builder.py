"""RefCOCO+ referring expressions: find the referred object's box among region proposals (VL-BERT's task).

Annotations: a json list of refs as VL-BERT's ``refcoco.py`` flattens the REFER files (the generated
``shapes`` corpus writes the same): ``ref_id``, ``image_id``, ``file_name``, ``width``, ``height``,
``sentence``, ``bbox`` (the referred object, ``[x, y, w, h]`` pixels) and ``proposals`` (``[[x, y, w, h],
...]``: the candidate boxes; real RefCOCO+ uses MAttNet's detections or all GT boxes of the image, the
release's ``TRAIN_BOXES: proposal+gt``).

Regions, by mode:

* ``use_images: true`` (default; e2e, as the release's RefCOCO+ configs): the image plus the ref's own
  proposals; the model computes their RoI features from pixels (``visual_feature_mode: e2e``). Proposals
  differ per ref, so this is the mode that needs no per-ref feature store.
* ``use_features: true`` (prec): the feature store's regions for the image (e.g. ``mmf_extract_features
  --extractor vinvl_x152c4``, the release's "detected regions" setting) are the proposals; the json's
  ``proposals`` are ignored.

Every sample gets the whole-image box first (``add_image_box``), ``region_targets`` (R,) = 1 where a
region's IoU with the referred box is >= 0.5 (the whole-image box included, as in the release) and
``gt_bbox`` (4,) xyxy, both in original-image pixels. Follows jackroos/VL-BERT
``refcoco/data/datasets/refcoco.py`` (image box, clamping, IoU labels). Deliberate difference: the
label threshold is IoU >= 0.5 (the release: > 0.5). A horizontal flip flips the boxes and swaps
"left"/"right" in the expression.
"""

from __future__ import annotations

import json

import torch
from torchvision.ops import box_iou

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vcr.builder import e2e_regions
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset
from mmf_plugins.processors.image_processors import swap_left_right

IOU_THRESHOLD = 0.5


def xywh_to_xyxy(boxes) -> torch.Tensor:
    b = torch.as_tensor(boxes, dtype=torch.float).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


class RefCOCODataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        path = resolve(config, config.annotations[dataset_type])
        with open(path, encoding="utf-8") as f:
            self.refs = json.load(f)
        if not isinstance(self.refs, list):
            raise ValueError(  # noqa: TRY004  (a data-file error)
                f"{path}: expected a json list of refs (VL-BERT's flattened RefCOCO+), got {type(self.refs).__name__}"
            )
        limit = (config.get("max_samples", None) or {}).get(dataset_type)
        if limit:
            self.refs = self.refs[: int(limit)]
        self.add_image_box = bool(config.get("add_image_box", True))

    def __len__(self):
        return len(self.refs)

    def get_item(self, idx):
        ref = self.refs[idx]
        gt = xywh_to_xyxy(ref["bbox"])[0]
        sample = Sample(id=idx, ref_id=int(ref["ref_id"]), image_id=ref["image_id"])
        text = ref["sentence"]
        if self.use_images:
            name = ref.get("file_name") or self.image_file(ref["image_id"])
            fields, flipped = e2e_regions(self, name, xywh_to_xyxy(ref["proposals"]), self.add_image_box)
            if flipped:
                W = fields["image_info_0"]["image_width"]
                gt = torch.stack([W - 1 - gt[2], gt[1], W - 1 - gt[0], gt[3]])
                text = swap_left_right(text)
        else:
            out = self.bbox_processor(dict(self.feature_db.get(self.feature_key(ref["image_id"]))))
            fields = {"image_feature_0": out["image_feature_0"], "image_info_0": out["image_info_0"]}
        info = fields["image_info_0"]
        W, H = float(info["image_width"]), float(info["image_height"])
        gt = torch.stack([gt[0].clamp(0, W - 1), gt[1].clamp(0, H - 1), gt[2].clamp(0, W - 1), gt[3].clamp(0, H - 1)])
        boxes, count = info["bbox"], int(info["num_boxes"])
        targets = torch.zeros(boxes.shape[0])
        if count:
            targets[:count] = (box_iou(boxes[:count], gt[None])[:, 0] >= IOU_THRESHOLD).float()
        sample.update(fields)
        sample.update(self.text_processor({"text": text}))
        sample["region_targets"] = targets
        sample["gt_bbox"] = gt
        return sample

    def format_for_prediction(self, batch, output):
        top = output["scores"].detach().argmax(dim=-1).cpu()
        boxes = output["boxes"].detach().float().cpu()
        rows = []
        for i, (ref_id, k) in enumerate(zip(batch["ref_id"].tolist(), top.tolist())):
            x1, y1, x2, y2 = boxes[i, k].tolist()
            rows.append({"ref_id": int(ref_id), "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]})
        return rows


@registry.register_builder("refcoco")
class RefCOCOBuilder(VLDatasetBuilder):
    default_name = "refcoco"
    dataset_class = RefCOCODataset
    source_hint = ("REFER refcoco+ (refs(unc).p, instances.json; https://github.com/lichengunc/refer) flattened to a "
                   "json list of refs with proposals, and COCO train2014 images")
    prediction_format = '[{"ref_id": int, "bbox": [x, y, w, h]}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/refcoco/defaults.yaml"
