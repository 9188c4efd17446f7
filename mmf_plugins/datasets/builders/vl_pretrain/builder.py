"""Vision-language pretraining pairs: the union of caption corpora (``annotations.<split>`` is a list of
jsonl files with ``image_id`` and ``caption``; COCO captions json files work too).

Two objectives' data, chosen by ``objective``:

* ``itm`` (SOHO): with probability ``itm_negative_prob`` the caption is swapped for a caption of a
  different image (``is_correct`` 0, else 1). MLM labels come from the text processor
  (``mask_probability``). Deliberate difference: the release groups ``sentence_group`` (4) captions per
  image inside one batch and draws negatives within the batch; here negatives are drawn per item from
  the whole corpus, which gives the same 50/50 ITM label balance without tying batch composition to it.
* ``contrastive`` (OSCAR+): ``[CLS] caption [SEP] tags [SEP]`` with ``contrastive_labels`` drawn by
  the official ``random_sent`` rule (``draw_label``): 0 = matched (p 0.5); 1 = tags replaced by another
  image's tags; 2 = caption replaced by another caption (0.25 / 0.25 with ``texta_false_prob`` 0.25).
  ``num_contrast_classes: 2`` gives vanilla OSCAR's binary case. MLM masks caption and tags.
"""

from __future__ import annotations

import json

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset, tags_from_record


def read_pairs(path) -> list[tuple[int, str]]:
    path = str(path)
    if path.endswith(".jsonl"):
        out = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out.append((int(r["image_id"]), r["caption"]))
        return out
    with open(path) as f:
        data = json.load(f)
    return [(int(a["image_id"]), a["caption"]) for a in data["annotations"]]


def draw_label(num_classes: int, texta_false_prob: float, has_tags: bool) -> int:
    """OSCAR+ ``random_sent``: 0 matched (p 0.5), 1 tags polluted, last class caption polluted."""
    p = float(torch.rand(()))
    if p > 0.5:
        return 0
    if num_classes == 2:
        return 1
    if p > texta_false_prob and has_tags:
        return 1
    return num_classes - 1


class VLPretrainDataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        files = config.annotations[dataset_type]
        files = [files] if isinstance(files, str) else list(files)
        self.pairs = [p for f in files for p in read_pairs(resolve(config, f))]
        n = (config.get("max_samples", None) or {}).get(dataset_type)
        if n:
            self.pairs = self.pairs[: int(n)]
        self.objective = str(config.get("objective", "itm"))
        if self.objective not in ("itm", "contrastive"):
            raise ValueError(f"dataset_config.{dataset_name}.objective must be 'itm' or 'contrastive', got '{self.objective}'")
        self.itm_negative_prob = float(config.get("itm_negative_prob", 0.5))
        self.num_contrast_classes = int(config.get("num_contrast_classes", 3))
        self.texta_false_prob = float(config.get("texta_false_prob", 0.25))

    def __len__(self):
        return len(self.pairs)

    def _other(self, idx: int) -> int:
        j = int(torch.randint(len(self.pairs), ()))
        while self.pairs[j][0] == self.pairs[idx][0] and len(self.pairs) > 1:
            j = int(torch.randint(len(self.pairs), ()))
        return j

    def get_item(self, idx):
        image_id, caption = self.pairs[idx]
        sample = Sample(image_id=image_id, id=idx)
        if self.objective == "itm":
            label = 1
            if float(torch.rand(())) < self.itm_negative_prob:
                caption, label = self.pairs[self._other(idx)][1], 0
            fields, caption, tags = self.load_visual(image_id, text=caption)
            sample.update(fields)
            sample.update(self.text_processor({"text": caption, "text_b": self.text_b(tags)}))
            sample["is_correct"] = label
            return sample
        fields, caption, tags = self.load_visual(image_id, text=caption)
        label = draw_label(self.num_contrast_classes, self.texta_false_prob, bool(tags))
        if label == 1:
            _, _, tags = self.load_visual_tags_only(self.pairs[self._other(idx)][0])
        elif label == self.num_contrast_classes - 1 and label != 0:
            caption = self.pairs[self._other(idx)][1]
        sample.update(fields)
        sample.update(self.text_processor({"text": caption, "text_b": tags or ""}))
        sample["contrastive_labels"] = label
        return sample

    def load_visual_tags_only(self, image_id):
        if not self.use_features:
            return {}, None, None
        record = self.feature_db.get(self.feature_key(image_id))
        return {}, None, tags_from_record(record, self.max_features)


@registry.register_builder("vl_pretrain")
class VLPretrainBuilder(VLDatasetBuilder):
    default_name = "vl_pretrain"
    dataset_class = VLPretrainDataset
    source_hint = "COCO/VG/SBU/CC caption files as jsonl {image_id, caption} (or COCO captions json)"

    @classmethod
    def config_path(cls):
        return "configs/datasets/vl_pretrain/defaults.yaml"

    def splits_files(self, config, split):
        files = config.get("annotations", {}).get(split)
        if files is None:
            return []
        files = [files] if isinstance(files, str) else list(files)
        out = [resolve(config, f) for f in files]
        if config.get("use_images", False) and (config.get("images", None) or {}).get(split):
            out.append(resolve(config, config.images[split]))
        if config.get("use_features", False) and (config.get("features", None) or {}).get(split):
            out.append(resolve(config, config.features[split]))
        return out
