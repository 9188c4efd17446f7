"""BaseDatasetBuilder: makes sure a dataset exists and loads its splits (MMF ``BaseDatasetBuilder``).

``build(config)`` checks (or, for the generated ``shapes`` corpus, creates) the files and says exactly
which file is missing and where it comes from; ``load(config, split)`` returns a ``BaseDataset``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from mmf_plugins.datasets.base_dataset import BaseDataset


class DatasetFileMissing(FileNotFoundError):
    """A file a dataset builder needs is absent; the message names the file and where to get it."""


class BaseDatasetBuilder:
    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name

    @classmethod
    def config_path(cls) -> str | None:
        """Defaults yaml relative to the repository root, e.g. ``configs/datasets/vqa2/defaults.yaml``."""
        return None

    def build(self, config: DictConfig) -> None:
        """Check (or create) the data. Raise ``DatasetFileMissing`` naming the file and its source."""

    def load(self, config: DictConfig, split: str) -> BaseDataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_registry_for_model(self, config: DictConfig) -> None:
        """Publish values a model needs (e.g. ``<name>_num_final_outputs``) in the registry."""

    # Declared submission format for ``mmf_predict`` (documentation; rows come from the dataset).
    prediction_format: str = "[]"
