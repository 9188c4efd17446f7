"""Evaluation loop and metric bookkeeping, shared by in-training validation and ``val``/``test`` runs.

A plain loop (``model.eval()``, ``torch.no_grad``, the run's autocast) over one DataLoader per dataset;
losses are averaged per key, metrics (``evaluation.metrics``: names or ``{type, params, datasets}``)
are computed per dataset and reported as ``<split>/<dataset>/<metric>``, as MMF logs them.
Prediction mode collects submission rows from each dataset's ``format_for_prediction``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.registry import registry

logger = logging.getLogger(__name__)


def build_metrics(config: DictConfig, dataset_name: str) -> dict:
    metrics = {}
    for spec in config.evaluation.get("metrics", []) or []:
        if isinstance(spec, str):
            name, params, only = spec, {}, None
        else:
            spec = OmegaConf.to_container(spec, resolve=True)
            name, params, only = spec["type"], spec.get("params", {}) or {}, spec.get("datasets")
        if only and dataset_name not in only:
            continue
        metrics[name] = registry.get_metric_class(name)(**params)
    return metrics


def _autocast(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, loaders, config: DictConfig, split: str = "val", device=None, predict: bool = False,
             max_batches: int | None = None) -> tuple[dict, dict]:
    """Returns (logged values, predictions per dataset name)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    predictions: dict[str, list] = {}
    total_losses = []
    precision = str(config.training.get("precision", "32"))
    for loader in loaders:
        dataset = loader.dataset
        name = dataset.dataset_name
        metrics = build_metrics(config, name)
        for m in metrics.values():
            m.reset()
        loss_sums: dict[str, float] = defaultdict(float)
        n_batches = 0
        rows = []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.to(device)
            with _autocast(precision, device):
                output = model(batch)
            for k, v in (output.get("losses") or {}).items():
                loss_sums[k] += float(v.detach().float())
            n_batches += 1
            if predict:
                rows.extend(model.format_for_prediction(dataset.format_for_prediction(batch, output), batch, output))
            else:
                for m in metrics.values():
                    m.update(batch, output)
        for k, v in loss_sums.items():
            # loss keys are "<dataset_type>/<dataset>/<loss>": report them under the eval split
            short = k.split("/", 1)[1] if "/" in k else k
            results[f"{split}/{short}"] = v / max(1, n_batches)
        if loss_sums:
            total_losses.append(sum(loss_sums.values()) / max(1, n_batches))
        if predict:
            predictions[name] = rows
        else:
            for m in metrics.values():
                for key, value in m.compute().items():
                    results[f"{split}/{name}/{key}"] = float(value)
    if total_losses:
        results[f"{split}/total_loss"] = sum(total_losses)
    if was_training:
        model.train()
    return results, predictions
