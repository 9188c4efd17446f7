"""Optimizers and LR schedulers by MMF name (``optimizer.type``, ``scheduler.type``).

Optimizers: ``adamw`` (alias MMF ``adam_w``/``AdamW``), ``adam``, ``sgd``; parameter groups come from
``model.get_optimizer_parameters(config)``. A group may carry ``"optimizer": "sgd"`` to be stepped by a
second optimizer (SOHO's release steps the backbone with SGD and the rest with AdamW); the trainer then
builds one optimizer per kind. Schedulers (stepped every update): ``warmup_linear``, ``warmup_cosine``
(transformers' schedule functions, as MMF), ``multistep`` / ``multi_step`` (MMF's ``lr_steps`` +
``lr_ratio`` with optional linear warmup).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.registry import registry

for _name in ("adamw", "adam_w", "AdamW"):
    registry.register_optimizer(_name)(torch.optim.AdamW)
for _name in ("adam", "Adam"):
    registry.register_optimizer(_name)(torch.optim.Adam)
for _name in ("sgd", "SGD"):
    registry.register_optimizer(_name)(torch.optim.SGD)

# keys an optimizer accepts per kind (others in ``optimizer.params`` are dropped for that kind)
_ALLOWED = {
    torch.optim.AdamW: {"lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused"},
    torch.optim.Adam: {"lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused"},
    torch.optim.SGD: {"lr", "momentum", "dampening", "weight_decay", "nesterov", "foreach"},
}


def build_optimizers(model: torch.nn.Module, config: DictConfig) -> list[torch.optim.Optimizer]:
    opt_cfg = config.optimizer
    default_kind = str(opt_cfg.type)
    params = OmegaConf.to_container(opt_cfg.get("params", {}) or {}, resolve=True)
    groups = model.get_optimizer_parameters(config) if hasattr(model, "get_optimizer_parameters") else None
    if not groups:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if isinstance(groups, (list, tuple)) and groups and not isinstance(groups[0], dict):
        groups = [{"params": list(groups)}]
    by_kind: dict[str, list[dict]] = {}
    for g in groups:
        g = dict(g)
        kind = g.pop("optimizer", default_kind)
        if g["params"]:
            by_kind.setdefault(kind, []).append(g)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = {id(p) for gs in by_kind.values() for g in gs for p in g["params"]}
    missing = trainable - grouped
    if missing:
        names = [n for n, p in model.named_parameters() if id(p) in missing][:10]
        raise ValueError(f"get_optimizer_parameters left trainable parameters out of every group: {names}; "
                         "add them to a group or set requires_grad=False")
    optimizers = []
    for kind, kind_groups in by_kind.items():
        cls = registry.get_optimizer_class(kind)
        allowed = _ALLOWED.get(cls, set(params))
        kwargs = {k: v for k, v in params.items() if k in allowed}
        for g in kind_groups:
            for k in list(g):
                if k not in ("params", "lr", "weight_decay", "momentum", "betas", "eps", "name", "initial_lr"):
                    g.pop(k)
            if cls is not torch.optim.SGD:
                g.pop("momentum", None)
        optimizers.append(cls(kind_groups, **kwargs))
    return optimizers


# --------------------------------------------------------------------------- schedulers
def _lambda_scheduler(optimizer, fn):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@registry.register_scheduler("warmup_linear")
def warmup_linear(optimizer, num_warmup_steps: int = 0, num_training_steps: int = 1, **_):
    def fn(step):
        if step < num_warmup_steps:
            return float(step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))

    return _lambda_scheduler(optimizer, fn)


@registry.register_scheduler("warmup_cosine")
def warmup_cosine(optimizer, num_warmup_steps: int = 0, num_training_steps: int = 1, num_cycles: float = 0.5, **_):
    def fn(step):
        if step < num_warmup_steps:
            return float(step) / float(max(1, num_warmup_steps))
        progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return _lambda_scheduler(optimizer, fn)


def _multistep(optimizer, lr_steps=(), lr_ratio: float = 0.1, use_warmup: bool = False,
               warmup_iterations: int = 0, warmup_factor: float = 0.2, **_):
    steps = sorted(int(s) for s in lr_steps)

    def fn(step):
        factor = lr_ratio ** sum(step >= s for s in steps)
        if use_warmup and step < warmup_iterations:
            alpha = float(step) / float(max(1, warmup_iterations))
            factor *= warmup_factor * (1.0 - alpha) + alpha
        return factor

    return _lambda_scheduler(optimizer, fn)


registry.register_scheduler("multistep")(_multistep)
registry.register_scheduler("multi_step")(_multistep)


def build_scheduler(optimizer, config: DictConfig):
    if not config.training.get("lr_scheduler", True) or not config.get("scheduler") or not config.scheduler.get("type"):
        return None
    fn = registry.get_scheduler_class(str(config.scheduler.type))
    params = OmegaConf.to_container(config.scheduler.get("params", {}) or {}, resolve=True)
    return fn(optimizer, **params)
