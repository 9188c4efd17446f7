"""NLVR2 (Suhr et al. 2019): official jsonl (``identifier``, ``sentence``, ``label`` "True"/"False")
with two images per statement. Items carry both images (``image``/``image_1`` or
``image_feature_0``/``image_feature_1``) and the statement once; ``targets`` is the class id
(1 = True), as OSCAR's pair mode expects. Prediction rows: ``{"identifier", "label"}``.
Image ids come from ``left_image_id``/``right_image_id`` when present, else from the file names.
"""

from __future__ import annotations

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, resolve
from mmf_plugins.datasets.builders.vl_dataset import VisionLanguageDataset
from mmf_plugins.datasets.databases.annotation_database import AnnotationDatabase


class NLVR2Dataset(VisionLanguageDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        self.db = AnnotationDatabase(str(resolve(config, config.annotations[dataset_type])))
        n = (config.get("max_samples", None) or {}).get(dataset_type)
        self.length = min(len(self.db), int(n)) if n else len(self.db)

    def __len__(self):
        return self.length

    @staticmethod
    def _image(item, side):
        return item.get(f"{side}_image_id", item.get(f"{side}_image"))

    def get_item(self, idx):
        item = self.db[idx]
        label = str(item["label"]).lower() == "true"
        sample = Sample(id=idx, identifier=item["identifier"], targets=int(label))
        text = item["sentence"]
        tags_all = []
        for slot, side in enumerate(("left", "right")):
            fields, text, tags = self.load_visual(self._image(item, side), slot=slot, text=text)
            sample.update(fields)
            tags_all.append(tags or "")
        sample.update(self.text_processor({"text": text, "text_b": self.text_b(" ".join(tags_all).strip())}))
        return sample

    def format_for_prediction(self, batch, output):
        pred = output["scores"].argmax(-1).tolist()
        return [{"identifier": i, "label": "True" if p == 1 else "False"} for i, p in zip(batch.identifier, pred)]


@registry.register_builder("nlvr2")
class NLVR2Builder(VLDatasetBuilder):
    default_name = "nlvr2"
    dataset_class = NLVR2Dataset
    zoo_key = "nlvr2"
    source_hint = "https://github.com/lil-lab/nlvr (nlvr2/data/{train,dev,test1}.json) and the NLVR2 images"
    prediction_format = '[{"identifier": str, "label": "True"|"False"}]'

    @classmethod
    def config_path(cls):
        return "configs/datasets/nlvr2/defaults.yaml"
