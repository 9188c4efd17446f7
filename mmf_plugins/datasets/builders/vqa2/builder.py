"""VQA v2 dataset (official ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``).

Each item: the question (with detector tags as segment B for VinVL, or a literal such as ``[MASK]`` for
VL-BERT), the image or its region features, and — where annotations exist — the 10 raw answers and
their soft-score ``targets`` from ``answer_processor``. Prediction rows: ``{"question_id", "answer"}``
(EvalAI's submission format). The test split has questions only, like the real one.

``questions_per_image: K`` (train split only; default 1 = one question per item, as MMF) makes each
training item one image with K of its questions (drawn without replacement while it has enough, with
replacement otherwise): ``input_ids`` (K, T), ``targets`` (K, A). A grid model then runs its backbone
once for K questions — the release's ``sentence_group`` mechanism (SOHO expands image features per
sentence), which makes end-to-end training from pixels several times cheaper per question.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset


def _load_json(path, key):
    with open(path) as f:
        data = json.load(f)
    if key not in data:
        raise ValueError(f"{path} has no '{key}' list; expected the official VQA v2 schema")
    return data[key]


class VQA2Dataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        ann = config.annotations[dataset_type]
        self.questions = _load_json(resolve(config, ann.questions), "questions")
        self.answers = {}
        if ann.get("answers"):
            path = resolve(config, ann.answers)
            if path.exists():
                self.answers = {a["question_id"]: a for a in _load_json(path, "annotations")}
        limit = config.get("max_samples", None) or {}
        n = limit.get(dataset_type) if hasattr(limit, "get") else None
        if n:
            self.questions = self.questions[: int(n)]
        self.group_size = int(config.get("questions_per_image", 1) or 1) if dataset_type == "train" else 1
        self.groups = None
        if self.group_size > 1:
            by_image: OrderedDict[int, list[int]] = OrderedDict()
            for i, q in enumerate(self.questions):
                by_image.setdefault(int(q["image_id"]), []).append(i)
            self.groups = list(by_image.values())

    def __len__(self):
        return len(self.groups) if self.groups is not None else len(self.questions)

    def get_item(self, idx):
        if self.groups is None:
            return self._question_item(idx)
        members = self.groups[idx]
        k = self.group_size
        if len(members) >= k:
            chosen = [members[int(i)] for i in torch.randperm(len(members))[:k]]
        else:
            chosen = [members[int(i)] for i in torch.randint(len(members), (k,))]
        items = [self._question_item(i, with_visual=(j == 0)) for j, i in enumerate(chosen)]
        sample = Sample(items[0])
        for key in ("input_ids", "input_mask", "segment_ids", "lm_label_ids", "targets"):
            if key in items[0]:
                sample[key] = torch.stack([it[key] for it in items])
        for key in ("question_id", "answers", "text", "question_type", "answer_type"):
            if key in items[0]:
                sample[key] = [it[key] for it in items]
        return sample

    def _question_item(self, idx, with_visual: bool = True):
        q = self.questions[idx]
        sample = Sample(question_id=int(q["question_id"]), image_id=int(q["image_id"]), id=int(q["question_id"]))
        if with_visual:
            fields, text, tags = self.load_visual(q["image_id"], text=q["question"])
            sample.update(fields)
        else:  # the group's image was loaded with its first question
            text, tags = q["question"], None
        sample.update(self.text_processor({"text": text, "text_b": self.text_b(tags)}))
        ann = self.answers.get(q["question_id"])
        if ann is not None:
            sample.update(self.answer_processor({"answers": [a["answer"] for a in ann["answers"]]}))
            sample["question_type"] = ann.get("question_type", "")
            sample["answer_type"] = ann.get("answer_type", "")
        return sample

    def format_for_prediction(self, batch, output):
        ap = self.answer_processor
        idx = ap.predict_indices(output["scores"])[1][:, 0].tolist()
        return [{"question_id": int(q), "answer": ap.idx2word(i)} for q, i in zip(batch.question_id.tolist(), idx)]


@registry.register_builder("vqa2")
class VQA2Builder(VLDatasetBuilder):
    default_name = "vqa2"
    dataset_class = VQA2Dataset
    zoo_key = "vqa2"
    source_hint = "https://visualqa.org/download.html (questions, annotations) and COCO 2014 images"
    prediction_format = '[{"question_id": int, "answer": str}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/vqa2/defaults.yaml"
