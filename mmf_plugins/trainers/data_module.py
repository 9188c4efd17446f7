"""Datasets for a run: builders -> datasets -> DataLoaders (MMF ``MultiDataModule``).

Training reads every dataset named in ``datasets`` through one ``MultiDataset`` and a
``ResumableBatchSampler`` (one dataset per batch, size-proportional choice); evaluation keeps one
DataLoader per dataset so metrics are reported per dataset (``val/<dataset>/<metric>``).
"""

from __future__ import annotations

import bisect
import logging

import torch
from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.config import dataset_list
from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import SampleList
from mmf_plugins.datasets.base_dataset import BadItem
from mmf_plugins.trainers.sampling import ResumableBatchSampler

logger = logging.getLogger(__name__)


class MultiDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list):
        self.datasets = datasets
        self.offsets = [0]
        for d in datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self):
        return self.offsets[-1]

    def locate(self, idx: int) -> tuple[int, int]:
        d = bisect.bisect_right(self.offsets, int(idx)) - 1
        return d, int(idx) - self.offsets[d]

    def __getitem__(self, idx):
        d, local = self.locate(idx)
        seed = getattr(idx, "seed", None)
        if seed is not None:
            from mmf_plugins.trainers.sampling import SeededIndex

            local = SeededIndex(local, seed)
        item = self.datasets[d][local]
        return (d, item)

    def collate_fn(self, items):
        d = items[0][0]
        return self.datasets[d].collate_fn([it for _, it in items])


def _dataset_config(config: DictConfig, name: str) -> DictConfig:
    node = config.dataset_config.get(name, None)
    if node is None:
        node = OmegaConf.create({})
    return node


def build_datasets(config: DictConfig, split: str) -> list:
    out = []
    for name in dataset_list(config):
        builder = registry.get_builder_class(name)(name) if _takes_name(name) else registry.get_builder_class(name)()
        ds_cfg = _dataset_config(config, name)
        builder.build(ds_cfg)
        builder.update_registry_for_model(ds_cfg)
        dataset = builder.load(ds_cfg, split)
        if dataset is not None:
            out.append(dataset)
    return out


def _takes_name(name: str) -> bool:
    import inspect

    cls = registry.get_builder_class(name)
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return len(params) > 1


class DataModule:
    """Plain holder of the loaders (Lightning takes DataLoaders directly)."""

    def __init__(self, config: DictConfig, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.train_datasets: list = []
        self.eval_datasets: dict[str, list] = {}
        self.sampler: ResumableBatchSampler | None = None

    def setup_train(self) -> None:
        self.train_datasets = build_datasets(self.config, "train")
        if not self.train_datasets:
            raise ValueError(f"no training data for datasets={self.config.datasets}")

    def eval_split(self, split: str) -> list:
        if split not in self.eval_datasets:
            self.eval_datasets[split] = build_datasets(self.config, split)
        return self.eval_datasets[split]

    def _loader_kwargs(self):
        t = self.config.training
        workers = int(t.num_workers)
        return dict(
            num_workers=workers,
            pin_memory=bool(t.get("pin_memory", False)) and torch.cuda.is_available(),
            persistent_workers=bool(t.get("persistent_workers", True)) and workers > 0,
            generator=torch.Generator().manual_seed(int(t.seed) if int(t.seed) >= 0 else 0),
        )

    def train_dataloader(self, start_batch: int = 0) -> torch.utils.data.DataLoader:
        if not self.train_datasets:
            self.setup_train()
        multi = MultiDataset(self.train_datasets)
        t = self.config.training
        self.sampler = ResumableBatchSampler(
            [len(d) for d in self.train_datasets], int(t.batch_size), seed=max(0, int(t.seed)), rank=self.rank,
            world_size=self.world_size, start_batch=start_batch,
            proportional=bool(t.get("dataset_size_proportional_sampling", True)),
        )
        return torch.utils.data.DataLoader(multi, batch_sampler=self.sampler, collate_fn=multi.collate_fn,
                                           **self._loader_kwargs())

    def eval_dataloaders(self, split: str) -> list[torch.utils.data.DataLoader]:
        t = self.config.training
        per_device = int(t.get("batch_size_per_device") or max(1, int(t.batch_size) // self.world_size))
        loaders = []
        kwargs = self._loader_kwargs()
        kwargs["persistent_workers"] = False
        for ds in self.eval_split(split):
            loaders.append(torch.utils.data.DataLoader(ds, batch_size=per_device, shuffle=False,
                                                       collate_fn=ds.collate_fn, **kwargs))
        return loaders

    def batches_per_epoch(self) -> int:
        if not self.train_datasets:
            self.setup_train()
        return max(1, sum(len(d) for d in self.train_datasets) // int(self.config.training.batch_size))


def count_bad(batch: SampleList) -> int:
    bad = batch.get("bad_items", []) if isinstance(batch, dict) else []
    return len(bad)


__all__ = ["DataModule", "MultiDataset", "BadItem", "build_datasets", "count_bad"]
