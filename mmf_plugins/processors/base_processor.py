"""Processors: callables ``dict -> dict`` built from ``{type, params}`` (MMF ``mmf/datasets/processors``).

A processor is constructed once per dataset from config and is stateless at call time (random
choices, e.g. MLM masking, draw from ``torch``'s global generator so DataLoader worker seeding applies).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.registry import registry


class BaseProcessor:
    def __init__(self, config: DictConfig | dict | None = None, *args, **kwargs):
        if config is None:
            config = {}
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        self.config = config

    def __call__(self, item: dict, *args, **kwargs) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def build_processor(spec: DictConfig | dict, **extra: Any) -> BaseProcessor:
    """``spec = {type: <registered name>, params: {...}}``; ``extra`` is passed as keyword args
    (e.g. ``data_dir`` so vocab paths can be relative to the dataset)."""
    if spec is None or "type" not in spec:
        raise ValueError(
            f"a processor needs {{type, params}}, got {spec!r}; e.g. "
            "{type: bert_tokenizer, params: {tokenizer_config: {type: <dir>}}}"
        )
    cls = registry.get_processor_class(spec["type"])
    params = spec.get("params", None) or {}
    return cls(params, **extra)
