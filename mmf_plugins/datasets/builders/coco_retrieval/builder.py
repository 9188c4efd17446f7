"""Image–text retrieval (COCO and Flickr30K, Karpathy splits) for cross-encoder models.

Training samples positives plus sampled negatives, as OSCAR's ``RetrievalDataset`` does: every
caption appears once as a positive (``is_correct`` 1) and, with probability ``negative_ratio``, a
negative replaces either the caption (50%) or the image (50%) by a random other one (label 0).
Evaluation scores every (image, caption) pair of the split (``max_eval_images`` caps it: 1000 for the
COCO 1K protocol; the 5-fold 1K average needs all 5000), batched by the DataLoader; each item carries
``image_id``, ``text_id`` and ``text_image_id`` (the caption's own image) for ``retrieval_recall``.
"""

from __future__ import annotations

import random

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.coco.builder import load_karpathy
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset


class RetrievalDataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        images = load_karpathy(resolve(config, config.annotations[dataset_type]), dataset_type)
        cap = config.get("max_eval_images", None) if dataset_type != "train" else (config.get("max_samples", None) or {}).get("train")
        if cap:
            images = images[: int(cap)]
        self.image_ids = [int(im.get("cocoid", im.get("imgid"))) for im in images]
        self.captions = [(i, s["raw"]) for i, im in enumerate(images) for s in im["sentences"]]
        self.train = dataset_type == "train"
        self.negative_ratio = float(config.get("negative_ratio", 1.0))

    def __len__(self):
        if self.train:
            return len(self.captions)
        return len(self.image_ids) * len(self.captions)

    def get_item(self, idx):
        if self.train:
            img_index, caption = self.captions[idx]
            label = 1
            # NOTE: torch's generator, reseeded per item by the trainer (deterministic, resumable)
            if float(torch.rand(())) < self.negative_ratio / (1.0 + self.negative_ratio):
                label = 0
                if float(torch.rand(())) < 0.5:  # wrong caption, same image
                    j = int(torch.randint(len(self.captions), ()))
                    while self.captions[j][0] == img_index and len(self.image_ids) > 1:
                        j = int(torch.randint(len(self.captions), ()))
                    caption = self.captions[j][1]
                else:  # wrong image, same caption
                    k = int(torch.randint(len(self.image_ids), ()))
                    while k == img_index and len(self.image_ids) > 1:
                        k = int(torch.randint(len(self.image_ids), ()))
                    img_index = k
            text_id, text_image = idx, self.captions[idx][0]
        else:
            img_index, text_id = divmod(idx, len(self.captions))
            text_image, caption = self.captions[text_id]
            label = int(text_image == img_index)
        image_id = self.image_ids[img_index]
        sample = Sample(image_id=image_id, text_id=text_id, text_image_id=self.image_ids[text_image],
                        is_correct=label, targets=label, id=idx)
        fields, caption, tags = self.load_visual(image_id, text=caption)
        sample.update(fields)
        sample.update(self.text_processor({"text": caption, "text_b": self.text_b(tags)}))
        return sample

    def format_for_prediction(self, batch, output):
        return [{"image_id": int(i), "text_id": int(t), "score": float(s)}
                for i, t, s in zip(batch.image_id.tolist(), batch.text_id.tolist(), output["scores"].float().tolist())]


@registry.register_builder("coco_retrieval")
class COCORetrievalBuilder(VLDatasetBuilder):
    default_name = "coco_retrieval"
    dataset_class = RetrievalDataset
    zoo_key = "karpathy"
    source_hint = "Karpathy splits dataset_coco.json (caption_datasets.zip) and COCO 2014 images"
    prediction_format = '[{"image_id": int, "text_id": int, "score": float}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/coco_retrieval/defaults.yaml"


@registry.register_builder("flickr30k_retrieval")
class Flickr30kRetrievalBuilder(COCORetrievalBuilder):
    default_name = "flickr30k_retrieval"
    source_hint = "Karpathy splits dataset_flickr30k.json (caption_datasets.zip) and Flickr30K images"

    @classmethod
    def config_path(cls):
        return "configs/datasets/flickr30k_retrieval/defaults.yaml"
