"""BaseModel: the contract every registered model follows (MMF ``mmf/models/base_model.py``).

A model is a plain ``nn.Module``:

* ``config_path()`` names its defaults yaml (merged under ``model_config.<name>``);
* ``build()`` creates the layers from ``self.config`` (called once by ``build_model``);
* ``forward(sample_list) -> dict`` returns ``scores`` and, when targets are present, ``losses``: a dict
  keyed ``"{dataset_type}/{dataset_name}/{loss_name}"`` that the trainer sums;
* ``get_optimizer_parameters(config)`` returns parameter groups (per-group lr / weight decay);
* ``format_state_key(key)`` maps a foreign checkpoint key to ours (used by ``checkpoint.resume_file``
  on checkpoints of older layouts); official checkpoints go through a registered converter instead.

Deliberate difference from MMF: losses are computed by the model (MMF also allows a ``losses:`` list
in config; we keep one place per model so converted heads and their losses stay together).
"""

from __future__ import annotations

import logging
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

logger = logging.getLogger(__name__)



class BaseModel(nn.Module):
    def __init__(self, config: DictConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = {}
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        self.config = config
        self._is_built = False

    @classmethod
    def config_path(cls) -> str | None:
        """Path of the model's defaults yaml, relative to the repository root
        (e.g. ``configs/models/soho/defaults.yaml``); resolved by ``common.config``."""
        return None

    def build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def init_losses(self) -> None:
        """Kept for MMF compatibility; models here compute their own losses in ``forward``."""

    def loss_key(self, sample_list, name: str) -> str:
        dataset_type = sample_list.get("dataset_type", "train")
        dataset_name = sample_list.get("dataset_name", "unknown")
        return f"{dataset_type}/{dataset_name}/{name}"

    def get_optimizer_parameters(self, config) -> list[dict]:
        """Default: two groups, no weight decay on biases and norm weights (BERT convention)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias"):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def format_state_key(self, key: str) -> str:
        return key

    def format_for_prediction(self, rows: list[dict], batch, output: dict) -> list[dict]:
        return rows

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, sample_list) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(sample_list)")


def build_model(model_name: str, model_config: DictConfig | dict) -> BaseModel:
    """Instantiate and build a registered model (MMF ``mmf.utils.build.build_model``)."""
    from mmf_plugins.common.registry import registry

    cls = registry.get_model_class(model_name)
    if not isinstance(model_config, DictConfig):
        model_config = OmegaConf.create(model_config or {})
    model = cls(model_config)
    model.build()
    model._is_built = True
    return model


def check_finite(losses: dict, step: int | None = None, ids=None) -> None:
    for k, v in losses.items():
        if isinstance(v, torch.Tensor) and not torch.isfinite(v).all():
            raise FloatingPointError(
                f"loss '{k}' is {v.detach().float().cpu().tolist()} at update {step}"
                + (f" on batch ids {list(ids)[:16]}" if ids is not None else "")
                + "; lower the learning rate, enable clip_norm, or check the inputs"
            )
