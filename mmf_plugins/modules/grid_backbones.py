"""Grid backbones: torchvision ResNet / ResNeXt trunks up to C5, for models trained from pixels.

Used by SOHO (researchmm/soho ``SOHO/models/backbone/resnet.py``, an mmcls-style ResNet with
``frozen_stages``/``norm_eval``/``with_cp``) and by any later grid-feature family (VirTex R-50).
The trunk is torchvision's ``ResNet`` with ``avgpool``/``fc`` removed, so parameter names are
torchvision's (``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv,bn}{1,2,3}``, ``downsample.{0,1}``), which
are also the names in SOHO's mmcv checkpoints.

Options (keyword-only, see :class:`GridBackbone`):

* ``frozen_stages`` (mmcls semantics): ``-1`` nothing frozen, ``0`` the stem, ``k`` the stem and
  ``layer1..layer k``. Frozen stages have ``requires_grad=False`` and their BatchNorms stay in eval
  mode even under ``model.train()``.
* ``norm_mode``: ``train`` (plain BatchNorm, batch statistics in training; mmcls default and SOHO's
  release), ``frozen`` (every BatchNorm replaced by ``torchvision.ops.FrozenBatchNorm2d``: running
  statistics and affine are constants, like detectron2), ``sync`` (SyncBatchNorm across processes
  under DDP).
* ``checkpoint_stages``: activation checkpointing per stage (``torch.utils.checkpoint``,
  non-reentrant). The release checkpoints per block (``with_cp``); per stage saves a little more
  memory for the same recompute. NOTE(parity): as in the release, a checkpointed stage in
  ``train`` norm mode updates BatchNorm running statistics twice per step (forward + recompute).
* ``channels_last``: memory format of weights and input (faster convolutions on recent GPUs).
* ``pretrained``: a LOCAL torchvision-format weights file (``.pth``/``.safetensors``); nothing is
  ever downloaded (the release uses ``torchvision://resnet18``; put that file on disk and name it).

Deliberate differences from the release: ``sync`` BatchNorm falls back to local statistics on CPU
tensors (torch's ``SyncBatchNorm`` raises there), so the same config runs in CPU tests; whole-backbone
freezing (``set_trainable(False)``, SOHO's paper warm-up) runs the trunk under ``torch.no_grad`` and keeps
every BatchNorm in eval mode, so a frozen backbone neither trains nor drifts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

# arch -> (torchvision constructor name, C5 channels)
GRID_ARCHS: dict[str, tuple[str, int]] = {
    "resnet18": ("resnet18", 512),
    "resnet34": ("resnet34", 512),
    "resnet50": ("resnet50", 2048),
    "resnet101": ("resnet101", 2048),
    "resnet152": ("resnet152", 2048),
    "resnext50_32x4d": ("resnext50_32x4d", 2048),
    "resnext101_32x8d": ("resnext101_32x8d", 2048),
    "resnext101_64x4d": ("resnext101_64x4d", 2048),
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
NORM_MODES = ("train", "frozen", "sync")


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that uses local batch statistics for CPU tensors.

    torch's SyncBatchNorm raises for CPU inputs once a process group exists (e.g. gloo tests); here
    it behaves like ``BatchNorm2d`` on CPU and synchronises on accelerators. Same state-dict keys.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type == "cpu":
            return _BatchNorm.forward(self, input)
        return super().forward(input)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected a 4-D input (B, C, H, W), got shape {tuple(input.shape)}")


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` (not FrozenBatchNorm2d) by :class:`SyncBatchNorm2d`,
    keeping weights, running statistics and ``requires_grad``; returns the (possibly new) module."""
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def build_norm(num_features: int, norm_mode: str) -> nn.Module:
    """A 2-D norm layer for the given mode (used by heads/necks that follow the backbone's mode)."""
    if norm_mode == "frozen":
        return FrozenBatchNorm2d(num_features)
    if norm_mode == "sync":
        return SyncBatchNorm2d(num_features)
    if norm_mode == "train":
        return nn.BatchNorm2d(num_features)
    raise ValueError(f"unknown norm mode {norm_mode!r}; expected one of {', '.join(NORM_MODES)}")


def _unwrap_state_dict(obj: dict) -> dict:
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return {(k.removeprefix("module.")): v for k, v in obj.items()}


class GridBackbone(nn.Module):
    """torchvision ResNet/ResNeXt trunk returning the last stage's grid (C5 for ``num_stages=4``).

    Input ``(B, 3, H, W)`` float, normalized; output ``(B, out_channels, ~H/32, ~W/32)``.
    """

    def __init__(
        self,
        *,
        arch: str = "resnet50",
        pretrained: str | os.PathLike | None = None,
        frozen_stages: int = -1,
        norm_mode: str = "train",
        channels_last: bool = False,
        checkpoint_stages: Iterable[str] | bool = (),
        num_stages: int = 4,
    ):
        super().__init__()
        if arch not in GRID_ARCHS:
            raise ValueError(f"unknown grid backbone arch {arch!r}; available: {', '.join(GRID_ARCHS)}")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm_mode {norm_mode!r}; expected one of {', '.join(NORM_MODES)}")
        if not 1 <= int(num_stages) <= 4:
            raise ValueError(f"num_stages must be 1..4 (4 = up to C5), got {num_stages}")
        if not -1 <= int(frozen_stages) <= int(num_stages):
            raise ValueError(f"frozen_stages must be in -1..{num_stages} (-1 = none, 0 = stem), got {frozen_stages}")
        self.arch = arch
        self.norm_mode = norm_mode
        self.frozen_stages = int(frozen_stages)
        self.num_stages = int(num_stages)
        self.channels_last = bool(channels_last)
        self._fully_frozen = False

        ctor, c5 = GRID_ARCHS[arch]
        kwargs = {"norm_layer": FrozenBatchNorm2d} if norm_mode == "frozen" else {}
        trunk = getattr(torchvision.models, ctor)(weights=None, **kwargs)
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        for i in range(1, self.num_stages + 1):
            self.add_module(f"layer{i}", getattr(trunk, f"layer{i}"))
        expansion = 4 if c5 == 2048 else 1
        self.out_channels = 64 * expansion * 2 ** (self.num_stages - 1)
        self.stride = 2 ** (self.num_stages + 1)

        stage_names = STAGES[: self.num_stages + 1]
        if checkpoint_stages is True:
            checkpoint_stages = stage_names
        elif checkpoint_stages is False or checkpoint_stages is None:
            checkpoint_stages = ()
        checkpoint_stages = tuple(checkpoint_stages)
        bad = [s for s in checkpoint_stages if s not in stage_names]
        if bad:
            raise ValueError(f"checkpoint_stages {bad} are not stages of this backbone; choose from {list(stage_names)}")
        self.checkpoint_stages = frozenset(checkpoint_stages)

        if pretrained:
            self.load_pretrained(pretrained)
        if norm_mode == "sync":
            convert_sync_batchnorm(self)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self._apply_freeze()

    @classmethod
    def from_config(cls, cfg) -> GridBackbone:
        """Build from a mapping with the constructor's keyword names (extra keys are an error)."""
        cfg = dict(cfg)
        allowed = {"arch", "pretrained", "frozen_stages", "norm_mode", "channels_last", "checkpoint_stages", "num_stages"}
        extra = sorted(set(cfg) - allowed)
        if extra:
            raise KeyError(f"unknown grid backbone option(s) {extra}; allowed: {sorted(allowed)}")
        if "checkpoint_stages" in cfg and not isinstance(cfg["checkpoint_stages"], bool):
            cfg["checkpoint_stages"] = list(cfg["checkpoint_stages"] or [])
        return cls(**cfg)

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load torchvision-format ImageNet weights from a local file; ``fc.*`` is ignored, anything
        else missing or unexpected is an error."""
        from mmf_plugins.zoo.conversion import load_weights_file

        path = os.fspath(path)
        if "://" in path:
            raise ValueError(
                f"backbone pretrained={path!r} is a URL; weights are read only from local files. Download it "
                f"once (e.g. torchvision's {self.arch} ImageNet weights) and give the file path"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"backbone weights file not found: {path}; expected a torchvision {self.arch} state dict (.pth or .safetensors)"
            )
        state = _unwrap_state_dict(load_weights_file(path))
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = set(self.state_dict())
        if self.norm_mode == "frozen":
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        # stages beyond num_stages are legitimately unused
        beyond = tuple(f"layer{i}." for i in range(self.num_stages + 1, 5))
        unexpected = [k for k in state if k not in own and not k.startswith(beyond)]
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit a torchvision {self.arch}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; is it the right architecture?"
            )
        state = {k: v for k, v in state.items() if k in own}
        self.load_state_dict(state, strict=False)
        logger.info("loaded %d backbone tensors from %s", len(state), path)

    # ------------------------------------------------------------------ freezing
    def _stage_modules(self, name: str) -> list[nn.Module]:
        return [self.conv1, self.bn1] if name == "stem" else [getattr(self, name)]

    def frozen_stage_names(self) -> list[str]:
        return list(STAGES[: self.frozen_stages + 1]) if self.frozen_stages >= 0 else []

    def _apply_freeze(self) -> None:
        frozen = set(self.frozen_stage_names())
        for name in STAGES[: self.num_stages + 1]:
            for m in self._stage_modules(name):
                for p in m.parameters():
                    p.requires_grad_(name not in frozen)
                for bn in m.modules():
                    if isinstance(bn, _BatchNorm):
                        bn.train(self.training and name not in frozen and not self._fully_frozen)

    def set_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or release (``True``) the whole trunk for a while; ``frozen_stages`` stay frozen.

        A temporary freeze runs the trunk under ``torch.no_grad`` with every BatchNorm in eval mode and
        leaves ``requires_grad`` alone: DDP registers gradient hooks only for parameters that require
        grad when it wraps the model, so toggling the flag would leave the backbone unsynchronised once
        released. Under DDP the frozen epochs need ``find_unused_parameters=True``.
        """
        self._fully_frozen = not trainable
        self._apply_freeze()

    @property
    def is_trainable(self) -> bool:
        return not self._fully_frozen

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters outside ``frozen_stages`` (whether or not a temporary full freeze is on)."""
        frozen = set(self.frozen_stage_names())
        for name in STAGES[: self.num_stages + 1]:
            if name in frozen:
                continue
            for m in self._stage_modules(name):
                yield from m.parameters()

    def train(self, mode: bool = True) -> GridBackbone:
        super().train(mode)
        self._apply_freeze()
        return self

    # ------------------------------------------------------------------ forward
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _run(self, name: str, fn, x: torch.Tensor) -> torch.Tensor:
        if (
            name in self.checkpoint_stages
            and self.training
            and torch.is_grad_enabled()
            and any(p.requires_grad for m in self._stage_modules(name) for p in m.parameters())
        ):
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"GridBackbone expects images (B, 3, H, W), got shape {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._fully_frozen):
            x = self._run("stem", self._stem, x)
            for i in range(1, self.num_stages + 1):
                name = f"layer{i}"
                x = self._run(name, getattr(self, name), x)
        return x


def build_grid_backbone(**kwargs) -> GridBackbone:
    """Keyword-only factory (same arguments as :class:`GridBackbone`)."""
    return GridBackbone(**kwargs)


__all__ = ["GRID_ARCHS", "GridBackbone", "SyncBatchNorm2d", "build_grid_backbone", "build_norm", "convert_sync_batchnorm"]