"""BaseDataset: one split of one dataset, producing ``Sample`` s (MMF ``mmf/datasets/base_dataset.py``).

Subclasses implement ``get_item(idx) -> Sample`` and ``__len__``. Processors named in
``config.processors`` are built once and set as attributes (``self.text_processor`` ...), as in MMF.

Bad data never kills a long job silently: an item whose file is corrupt or missing raises inside
``get_item``; ``__getitem__`` turns that into a ``BadItem`` (index, reason), the collate function
drops it and lists it in ``batch["bad_items"]``, and the trainer counts them and stops only past
``max_bad_fraction`` (a per-dataset config key, default 0.01).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.sample import Sample, SampleList, collate
from mmf_plugins.processors.base_processor import build_processor

logger = logging.getLogger(__name__)

# Exceptions that mean "this item's data is bad", as opposed to a bug in our code.
DATA_ERRORS = (OSError, ValueError, KeyError, IndexError, json.JSONDecodeError, RuntimeError, EOFError)


@dataclass
class BadItem:
    index: int
    reason: str


class BaseDataset(torch.utils.data.Dataset):
    def __init__(self, dataset_name: str, config: DictConfig | dict, dataset_type: str = "train"):
        super().__init__()
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config or {})
        self.dataset_name = dataset_name
        self.dataset_type = dataset_type
        self.config = config
        self.processor_names: list[str] = []

    # ------------------------------------------------------------- processors
    def init_processors(self, **extra) -> None:
        for key, spec in (self.config.get("processors", None) or {}).items():
            if spec is None:
                continue
            setattr(self, key, build_processor(spec, **extra))
            self.processor_names.append(key)

    # ------------------------------------------------------------------ items
    def get_item(self, idx: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, idx: int):
        seed = getattr(idx, "seed", None)
        if seed is not None:
            # NOTE: per-item seeding (see trainers/sampling.py) makes random processing independent of
            # the number of workers and of where a run was resumed. Only the CPU generator: torch.manual_seed
            # also seeds every CUDA device and costs ~0.4 ms per call (measured), a tenth of an item.
            torch.default_generator.manual_seed(seed)
        try:
            sample = self.get_item(int(idx))
        except DATA_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
            logger.warning("%s/%s item %d skipped: %s", self.dataset_name, self.dataset_type, idx, reason)
            return BadItem(idx, reason)
        sample["dataset_name"] = self.dataset_name
        sample["dataset_type"] = self.dataset_type
        return sample

    def collate_fn(self, items: list) -> SampleList:
        good = [s for s in items if not isinstance(s, BadItem)]
        bad = [s for s in items if isinstance(s, BadItem)]
        batch = collate(good, self.dataset_name, self.dataset_type)
        batch["bad_items"] = [(b.index, b.reason) for b in bad]
        return batch

    # ------------------------------------------------------------ prediction
    def format_for_prediction(self, batch: SampleList, output: dict) -> list[dict]:
        """Rows of the submission file for this batch (overridden per dataset)."""
        raise NotImplementedError(f"dataset '{self.dataset_name}' does not declare a prediction format")

    def max_bad_fraction(self) -> float:
        return float(self.config.get("max_bad_fraction", 0.01))
