"""Sample and SampleList: the one batch type every model reads.

Follows MMF ``mmf/common/sample.py``: a ``Sample`` is a dict with attribute access for one item; a
``SampleList`` is the collated batch, also a dict with attribute access, carrying ``dataset_name``
and ``dataset_type``. Deliberate differences: collate pads variable-size tensors itself (MMF needs
processors to pre-pad), so images of different sizes batch with a pixel mask (``image_mask``) and
region features of different counts batch with zero padding; ``to`` / ``pin_memory`` recurse into
nested SampleLists (``image_info_0``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

import torch

# Padding value per field when items of different length are batched (default 0).
PAD_VALUES = {"lm_label_ids": -1, "mlm_labels": -1, "masked_ids": 0, "region_labels": -1}
# Batch-level bookkeeping, not per-item data (never counted as the batch size).
BOOKKEEPING_FIELDS = {"bad_items", "dataset_name", "dataset_type"}
# Fields whose padded area gets a boolean validity mask ``<field>_mask`` (True = real data).
MASKED_FIELDS = {"image": 2, "image_1": 2}  # value: number of trailing dims the mask covers (H, W)


class Sample(OrderedDict):
    """One item: ``sample.input_ids`` or ``sample["input_ids"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"Sample has no field '{key}'; fields: {', '.join(self.keys())}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def fields(self) -> list[str]:
        return list(self.keys())


class SampleList(OrderedDict):
    """A batch. Tensors are stacked (padded when sizes differ); other values become lists."""

    def __init__(self, samples: Iterable[dict] | dict | None = None):
        super().__init__()
        if samples is None:
            return
        if isinstance(samples, dict):
            for k, v in samples.items():
                self[k] = v
            return
        samples = list(samples)
        if not samples:
            return
        for key in samples[0].keys():
            values = [s.get(key) for s in samples]
            self[key] = collate_values(key, values, self)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"Key {key} not found in the SampleList; fields: {', '.join(self.keys())}. "
                "Check that the dataset's processors produce it."
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def fields(self) -> list[str]:
        return list(self.keys())

    def add_field(self, key: str, value: Any) -> None:
        self[key] = value

    def get_batch_size(self) -> int:
        for k, v in self.items():
            if k in BOOKKEEPING_FIELDS:
                continue
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.size(0)
            if isinstance(v, SampleList):
                n = v.get_batch_size()
                if n:
                    return n
            if isinstance(v, list):
                return len(v)
        return 0

    def to(self, device, non_blocking: bool = True) -> "SampleList":
        out = SampleList()
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, SampleList):
                v = v.to(device, non_blocking)
            out[k] = v
        return out

    def pin_memory(self) -> "SampleList":
        out = SampleList()
        for k, v in self.items():
            if isinstance(v, torch.Tensor) and v.device.type == "cpu":
                v = v.pin_memory()
            elif isinstance(v, SampleList):
                v = v.pin_memory()
            out[k] = v
        return out


def pad_stack(tensors: list[torch.Tensor], pad_value: float = 0) -> tuple[torch.Tensor, bool]:
    """Stack tensors of equal rank, padding each dim to the batch max. Returns (batch, was_padded)."""
    shapes = [t.shape for t in tensors]
    if all(s == shapes[0] for s in shapes):
        return torch.stack(tensors), False
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"cannot batch tensors of different rank: {sorted({tuple(s) for s in shapes})}")
    max_shape = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    out = tensors[0].new_full([len(tensors), *max_shape], pad_value)
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, n) for n in t.shape])] = t
    return out, True


def collate_values(key: str, values: list, parent: SampleList | None = None) -> Any:
    first = next((v for v in values if v is not None), None)
    if first is None:
        return values
    if isinstance(first, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in values):
        batch, padded = pad_stack(values, PAD_VALUES.get(key, 0))
        if key in MASKED_FIELDS and parent is not None:
            nd = MASKED_FIELDS[key]
            mask = torch.zeros(batch.shape[0], *batch.shape[-nd:], dtype=torch.bool)
            for i, t in enumerate(values):
                mask[(i, *[slice(0, n) for n in t.shape[-nd:]])] = True
            parent[f"{key}_mask"] = mask
        return batch
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        return SampleList(values)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool) if all(isinstance(v, bool) for v in values) else values
    if isinstance(first, int) and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, float) and all(isinstance(v, (int, float)) for v in values):
        return torch.tensor(values, dtype=torch.float)
    return values


def collate(samples: list[dict], dataset_name: str | None = None, dataset_type: str | None = None) -> SampleList:
    """DataLoader ``collate_fn``: drops ``None`` items (corrupt data skipped by the dataset)."""
    samples = [s for s in samples if s is not None]
    batch = SampleList(samples)
    if dataset_name is not None:
        batch["dataset_name"] = dataset_name
    if dataset_type is not None:
        batch["dataset_type"] = dataset_type
    if samples and "dataset_name" in samples[0] and isinstance(batch.get("dataset_name"), list):
        batch["dataset_name"] = batch["dataset_name"][0]
    if samples and "dataset_type" in samples[0] and isinstance(batch.get("dataset_type"), list):
        batch["dataset_type"] = batch["dataset_type"][0]
    return batch


def to_device(batch: Any, device) -> Any:
    if isinstance(batch, (SampleList, torch.Tensor)):
        return batch.to(device)
    return batch
