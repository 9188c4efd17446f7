"""COCO captioning on Karpathy splits (``dataset_coco.json``), the captioning protocol of
OSCAR/VinVL: training items are (image, one caption); evaluation items are one per image with all its
reference captions (``references``) for BLEU/CIDEr. Prediction rows: ``{"image_id", "caption"}``.

Decoding: a captioning model returns token ids; the builder registers the text processor's
``batch_decode`` as ``{dataset}_caption_decoder`` (``update_registry_for_model``) for a model to turn its
``caption_ids`` into the ``captions`` strings the caption metrics read; ``format_for_prediction`` uses
those strings, or decodes ``caption_ids`` itself. VinVL uses the ``vinvl_caption`` text processor.
"""

from __future__ import annotations

import json

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, data_root, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset
from mmf_plugins.processors.base_processor import build_processor

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def load_karpathy(path, split: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if "images" not in data:
        raise ValueError(f"{path} is not a Karpathy split file (no 'images' list)")
    wanted = KARPATHY_SPLITS.get(split, (split,))
    return [im for im in data["images"] if im.get("split") in wanted]


class CaptionDataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        self.images = load_karpathy(resolve(config, config.annotations[dataset_type]), dataset_type)
        n = (config.get("max_samples", None) or {}).get(dataset_type)
        if n:
            self.images = self.images[: int(n)]
        self.train = dataset_type == "train"
        self.items = ([(i, j) for i, im in enumerate(self.images) for j in range(len(im["sentences"]))]
                      if self.train else [(i, None) for i in range(len(self.images))])

    def __len__(self):
        return len(self.items)

    def image_id_of(self, im) -> int:
        return int(im.get("cocoid", im.get("imgid")))

    def get_item(self, idx):
        i, j = self.items[idx]
        im = self.images[i]
        image_id = self.image_id_of(im)
        refs = [s["raw"] for s in im["sentences"]]
        caption = refs[j] if j is not None else refs[0]
        sample = Sample(image_id=image_id, id=idx)
        fields, caption, tags = self.load_visual(image_id, text=caption)
        sample.update(fields)
        sample.update(self.text_processor({"text": caption, "text_b": self.text_b(tags)}))
        sample["references"] = refs
        sample["tags"] = tags or ""
        return sample

    def format_for_prediction(self, batch, output):
        captions = output.get("captions")
        if captions is None or not all(isinstance(c, str) for c in captions):
            ids = output.get("caption_ids", captions)
            if ids is None or not hasattr(self.text_processor, "batch_decode"):
                raise KeyError(
                    f"dataset '{self.dataset_name}' predictions need output['captions'] (strings) or output['caption_ids'] "
                    "with a text processor that can batch_decode (e.g. vinvl_caption)"
                )
            captions = self.text_processor.batch_decode(ids)
        return [{"image_id": int(i), "caption": c} for i, c in zip(batch.image_id.tolist(), captions)]


@registry.register_builder("coco")
class COCOCaptionBuilder(VLDatasetBuilder):
    default_name = "coco"
    dataset_class = CaptionDataset
    zoo_key = "karpathy"
    source_hint = "Karpathy splits dataset_coco.json (caption_datasets.zip) and COCO 2014 images"
    prediction_format = '[{"image_id": int, "caption": str}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/coco/defaults.yaml"

    def update_registry_for_model(self, config):
        super().update_registry_for_model(config)
        spec = (config.get("processors", None) or {}).get("text_processor")
        if spec is None:
            return
        processor = build_processor(spec, data_dir=str(data_root(config)))
        if hasattr(processor, "batch_decode"):
            registry.register(f"{self.dataset_name}_caption_decoder", processor.batch_decode)
