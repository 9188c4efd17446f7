"""A text-only MLM corpus (one sentence or passage per line), VL-BERT's BooksCorpus/Wikipedia stream:
VL-BERT mixes text-only batches 1:1 with image–text ones (``datasets=vl_pretrain,text_corpus`` with
``multitasking`` sampling). Items have no visual fields; ``text_only`` marks them.
"""

from __future__ import annotations

from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample
from mmf_plugins.datasets.base_dataset import BaseDataset
from mmf_plugins.datasets.builders.vl_builder import VLDatasetBuilder, data_root, resolve


class TextCorpusDataset(BaseDataset):
    def __init__(self, dataset_name, config, dataset_type):
        super().__init__(dataset_name, config, dataset_type)
        path = resolve(config, config.annotations[dataset_type])
        with open(path, encoding="utf-8") as f:
            self.lines = [line.strip() for line in f if line.strip()]
        n = (config.get("max_samples", None) or {}).get(dataset_type)
        if n:
            self.lines = self.lines[: int(n)]
        self.init_processors(data_dir=str(data_root(config)), dataset_type=dataset_type)

    def __len__(self):
        return len(self.lines)

    def get_item(self, idx):
        sample = Sample(id=idx, text_only=True)
        sample.update(self.text_processor({"text": self.lines[idx]}))
        return sample


@registry.register_builder("text_corpus")
class TextCorpusBuilder(VLDatasetBuilder):
    default_name = "text_corpus"
    dataset_class = TextCorpusDataset
    source_hint = "a plain text file, one sentence or passage per line (VL-BERT used BooksCorpus + English Wikipedia)"

    @classmethod
    def config_path(cls):
        return "configs/datasets/text_corpus/defaults.yaml"
