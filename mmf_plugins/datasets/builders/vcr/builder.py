"""VCR question -> answer (Q->A) as VL-BERT reads it: one ``[CLS] q [SEP] a [SEP]`` row per candidate,
words that name an object tagged with that object's box.

Annotation rows (``vcr_<split>.jsonl``, the official VCR schema; the generated ``shapes`` corpus writes
the same): ``img_fn`` (image path under ``images.<split>``), ``objects`` (class names), ``boxes``
(``[x1, y1, x2, y2, score]`` per object, original pixels), ``question`` and ``answer_choices`` (token
lists where an object reference is a list of object indices, ``[[0], "is", "red"]``), ``answer_label``.

Follows jackroos/VL-BERT ``vcr/data/datasets/vcr.py`` (``retokenize_and_convert_to_ids_with_tag``,
Q2A truncation) and ``vcr/modules/resnet_vlbert_for_vcr.py`` (``prepare_text_from_qa``): an object
reference becomes the word pieces of the object's name tagged ``index + 1`` (the whole-image box is
region 0), ``[i, j]`` reads "name_i and name_j" ("and" untagged); other words, ``[CLS]`` and ``[SEP]``
get tag 0; token types are 0 for ``[CLS] q [SEP]`` and 1 for ``a [SEP]``; while
``len(q) + len(a) > max_seq_length - 3`` the last token of the answer is dropped when the answer is
strictly longer, else the last token of the question.

Sample fields: ``input_ids, input_mask, segment_ids, text_tags`` of shape ``(num_choices, max_seq_length)``,
``targets`` (index of the right answer), and the regions: ``image`` + ``image_info_0`` (e2e, default:
boxes from the annotation, ``image_info_0.scale`` maps them onto the resized image) or
``image_feature_0`` + ``image_info_0`` from a feature store whose record for the image (keyed by the stem of
``img_fn``) holds features of exactly the annotation's boxes, in order (``mmf_extract_features --extractor
given_boxes``, or ``shapes_detector`` with ``--boxes``).

Deliberate differences: the question is truncated per candidate (the release shortens one shared
question list while looping over the candidates, so later candidates can see a shorter question); no
gender-neutral names for "person" (VL-BERT swaps them in), no segmentation masks on RoI features, no
rationales (QA->R); a horizontal flip (``image_processor.horizontal_flip``) flips the boxes and swaps
"left"/"right" in every word.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset
from mmf_plugins.processors.bbox_processors import vl_bert_boxes
from mmf_plugins.processors.image_processors import swap_left_right


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def e2e_regions(dataset: VisionLanguageDataset, image_name: str, boxes: torch.Tensor, add_image_box: bool) -> tuple[dict, bool]:
    """VL-BERT's e2e visual input for one item: the processed ``image`` and ``image_info_0`` with the boxes
    (original pixels, clamped, whole-image box first when ``add_image_box``), the image size and ``scale``
    (resized / original, x and y). Returns (fields, flipped)."""
    img = dataset.image_db.load(image_name)
    H, W = int(img.shape[-2]), int(img.shape[-1])
    out = dataset.image_processor({"image": img}) if hasattr(dataset, "image_processor") else {
        "image": img.float() / 255, "image_resized_size": (H, W), "flipped": False}
    h, w = out["image_resized_size"]
    boxes = boxes.reshape(-1, 4).float().clone()
    flipped = bool(out.get("flipped", False))
    if flipped:
        boxes[:, [0, 2]] = (W - 1) - boxes[:, [2, 0]]
    bbox = vl_bert_boxes(boxes, W, H, add_image_box=add_image_box)
    n = int(bbox.shape[0])
    info = {"bbox": bbox, "num_boxes": n, "max_features": n, "image_width": W, "image_height": H,
            "has_image_box": add_image_box, "scale": torch.tensor([w / W, h / H], dtype=torch.float)}
    return {"image": out["image"], "image_info_0": info}, flipped


class VCRDataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        self.items = read_jsonl(resolve(config, config.annotations[dataset_type]))
        limit = (config.get("max_samples", None) or {}).get(dataset_type)
        if limit:
            self.items = self.items[: int(limit)]
        self.num_choices = int(config.get("num_choices", 4))
        self.add_image_box = bool(config.get("add_image_box", True))
        tp = self.text_processor
        self.max_seq_length = int(tp.max_seq_length)
        self._encode = tp.tokenizer.backend_tokenizer.encode
        self.cls_id, self.sep_id, self.pad_id = tp.cls_id, tp.sep_id, tp.pad_id
        self.and_ids = self._encode("and", add_special_tokens=False).ids

    def __len__(self):
        return len(self.items)

    # ------------------------------------------------------------------------------- text
    def tokens_with_tags(self, tokens: list, names: list[str], flipped: bool) -> tuple[list[int], list[int]]:
        """Word pieces and their region tags (see the module docstring)."""
        offset, plain = (1, 0) if self.add_image_box else (0, -1)
        ids: list[int] = []
        tags: list[int] = []
        for token in tokens:
            if isinstance(token, list):
                for j, index in enumerate(token):
                    if not isinstance(index, int) or not 0 <= index < len(names):
                        raise ValueError(f"object reference {index!r} outside the {len(names)} objects {names}")
                    if j:
                        ids += self.and_ids
                        tags += [plain] * len(self.and_ids)
                    pieces = self._encode(names[index], add_special_tokens=False).ids
                    ids += pieces
                    tags += [index + offset] * len(pieces)
            else:
                word = swap_left_right(str(token)) if flipped else str(token)
                pieces = self._encode(word, add_special_tokens=False).ids
                ids += pieces
                tags += [plain] * len(pieces)
        return ids, tags

    def encode_choices(self, item: dict, flipped: bool) -> dict:
        names = [str(o) for o in item["objects"]]
        choices = item["answer_choices"]
        if len(choices) > self.num_choices:
            raise ValueError(f"{len(choices)} answer choices but num_choices={self.num_choices}")
        q_ids, q_tags = self.tokens_with_tags(item["question"], names, flipped)
        C, T = len(choices), self.max_seq_length
        out = {
            "input_ids": torch.full((C, T), self.pad_id, dtype=torch.long),
            "input_mask": torch.zeros((C, T), dtype=torch.long),
            "segment_ids": torch.zeros((C, T), dtype=torch.long),
            "text_tags": torch.zeros((C, T), dtype=torch.long),
        }
        for c, answer in enumerate(choices):
            a_ids, a_tags = self.tokens_with_tags(answer, names, flipped)
            q, qt = list(q_ids), list(q_tags)
            while len(q) + len(a_ids) > T - 3:
                if len(a_ids) > len(q):
                    a_ids, a_tags = a_ids[:-1], a_tags[:-1]
                else:
                    q, qt = q[:-1], qt[:-1]
            ids = [self.cls_id, *q, self.sep_id, *a_ids, self.sep_id]
            tags = [0, *qt, 0, *a_tags, 0]
            n = len(ids)
            out["input_ids"][c, :n] = torch.tensor(ids)
            out["input_mask"][c, :n] = 1
            out["segment_ids"][c, len(q) + 2 : n] = 1
            out["text_tags"][c, :n] = torch.tensor(tags)
        return out

    # ------------------------------------------------------------------------------ items
    def get_item(self, idx):
        item = self.items[idx]
        boxes = torch.tensor([b[:4] for b in item["boxes"]], dtype=torch.float).reshape(-1, 4)
        if boxes.shape[0] != len(item["objects"]):
            raise ValueError(f"VCR item {item.get('annot_id')}: {boxes.shape[0]} boxes for {len(item['objects'])} objects")
        image_id = item.get("image_id", Path(item["img_fn"]).stem)
        sample = Sample(id=idx, annot_id=str(item.get("annot_id", idx)), image_id=image_id)
        flipped = False
        if self.use_images:
            fields, flipped = e2e_regions(self, item["img_fn"], boxes, self.add_image_box)
        else:
            # the store is keyed by image file stem (mmf_extract_features): the file the annotation names
            key = Path(item["img_fn"]).stem if item.get("img_fn") else image_id
            fields = self.feature_regions(key, len(item["objects"]))
        sample.update(fields)
        sample.update(self.encode_choices(item, flipped))
        if "answer_label" in item:
            sample["targets"] = int(item["answer_label"])
        return sample

    def feature_regions(self, image_id, num_objects: int) -> dict:
        record = self.feature_db.get(self.feature_key(image_id))
        out = self.bbox_processor(dict(record))
        info = out["image_info_0"]
        expected = num_objects + int(bool(info.get("has_image_box", False)))
        if int(info["num_boxes"]) != expected:
            raise ValueError(
                f"feature record {self.feature_key(image_id)} has {int(info['num_boxes'])} regions but the VCR item has "
                f"{num_objects} objects (+ image box): VCR needs features of its own boxes, in order — extract them with "
                "mmf_extract_features --extractor given_boxes --boxes <boxes per image>, or use use_images: true (e2e)"
            )
        if not info.get("has_image_box", False) and self.add_image_box:
            raise ValueError("VCR with add_image_box needs the bbox processor's format: vl_bert (whole-image box first)")
        return {"image_feature_0": out["image_feature_0"], "image_info_0": info}

    def format_for_prediction(self, batch, output):
        probs = output["scores"].detach().float().softmax(dim=-1).cpu()
        return [{"annot_id": a, "answer": int(p.argmax()), "answer_probs": [round(float(x), 6) for x in p]}
                for a, p in zip(batch["annot_id"], probs)]


@registry.register_builder("vcr")
class VCRBuilder(VLDatasetBuilder):
    default_name = "vcr"
    dataset_class = VCRDataset
    source_hint = "https://visualcommonsense.com/download/ (train.jsonl, val.jsonl, vcr1images/)"
    prediction_format = '[{"annot_id": str, "answer": int, "answer_probs": [float]}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/vcr/defaults.yaml"
