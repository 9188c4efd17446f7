"""SNLI-VE (Xie et al. 2019): jsonl with ``Flickr30K_ID`` (premise image), ``sentence2`` (hypothesis)
and ``gold_label``; ``targets`` is the class id in ``LABELS`` order. Prediction rows:
``{"pairID", "gold_label"}``. (Which release — original or e-SNLI-VE re-annotated — is the user's
choice of files; say which in reported numbers.)
"""

from __future__ import annotations

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset
from mmf_plugins.datasets.databases.annotation_database import AnnotationDatabase

LABELS = ("entailment", "neutral", "contradiction")


class SNLIVEDataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        self.db = AnnotationDatabase(str(resolve(config, config.annotations[dataset_type])))
        n = (config.get("max_samples", None) or {}).get(dataset_type)
        self.length = min(len(self.db), int(n)) if n else len(self.db)

    def __len__(self):
        return self.length

    def get_item(self, idx):
        item = self.db[idx]
        label = item["gold_label"]
        if label not in LABELS:
            raise ValueError(f"gold_label '{label}' of pair {item.get('pairID')} is not one of {LABELS}")
        image_id = item.get("image_id", item["Flickr30K_ID"])
        sample = Sample(id=idx, pairID=str(item.get("pairID", idx)), image_id=int(image_id) if str(image_id).isdigit() else idx,
                        targets=LABELS.index(label))
        fields, text, tags = self.load_visual(image_id, text=item["sentence2"])
        sample.update(fields)
        sample.update(self.text_processor({"text": text, "text_b": self.text_b(tags)}))
        return sample

    def format_for_prediction(self, batch, output):
        pred = output["scores"].argmax(-1).tolist()
        return [{"pairID": p, "gold_label": LABELS[i]} for p, i in zip(batch.pairID, pred)]


@registry.register_builder("snli_ve")
class SNLIVEBuilder(VLDatasetBuilder):
    default_name = "snli_ve"
    dataset_class = SNLIVEDataset
    zoo_key = "snli_ve"
    source_hint = "https://github.com/necla-ml/SNLI-VE (snli_ve_{train,dev,test}.jsonl) and Flickr30K images"
    prediction_format = '[{"pairID": str, "gold_label": str}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/snli_ve/defaults.yaml"
