"""Weights files and key reports: the one place checkpoints are read and matched to a model.

* ``load_weights_file(path)``: ``.safetensors`` through safetensors; anything else through
  ``torch.load(weights_only=True)``. A pickle that needs arbitrary classes is refused with a message
  (never unpickled), a truncated or corrupt file raises ``CheckpointError`` naming the file.
* ``ConversionReport``: what a converter mapped, left unused, or could not fill; printed by
  ``mmf_convert`` and by ``checkpoint.resume_zoo``. Converters (registered with
  ``registry.register_converter(name)``) are pure functions
  ``convert(official_state_dict, **options) -> (state_dict, ConversionReport)``.
* ``load_state_dict_with_report(model, state_dict)``: loads, reports missing / unexpected /
  mismatched keys; shape mismatches are errors, never skipped silently.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (official key, our key)
    unused: list[str] = field(default_factory=list)  # official keys deliberately or unexpectedly not used
    missing: list[str] = field(default_factory=list)  # our keys the official checkpoint does not fill
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, ckpt shape, model shape)
    notes: list[str] = field(default_factory=list)  # changes of meaning: ties, transposes, dropped heads

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def summary(self) -> str:
        lines = [
            f"mapped: {len(self.mapped)}  unused: {len(self.unused)}  missing: {len(self.missing)}"
            f"  mismatched: {len(self.mismatched)}"
        ]
        for title, keys in (("unused", self.unused), ("missing", self.missing)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20})" if len(keys) > 20 else "")
                lines.append(f"  {title}: {shown}")
        for k, a, b in self.mismatched:
            lines.append(f"  mismatched: {k}: checkpoint {tuple(a)} vs model {tuple(b)}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "mapped": [list(m) for m in self.mapped],
            "unused": list(self.unused),
            "missing": list(self.missing),
            "mismatched": [[k, list(a), list(b)] for k, a, b in self.mismatched],
            "notes": list(self.notes),
        }


def load_weights_file(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    """Read a checkpoint file safely. Returns whatever dict it holds (state dict or wrapper)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes); download it again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}; the file is corrupt or truncated") from e
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to unpickle {path}: it needs Python objects beyond tensors and containers "
            f"({str(e).splitlines()[0][:200]}). Only weights are loaded (torch.load weights_only=True); "
            "re-save the state dict alone, or convert it with mmf_convert in a trusted environment"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}; the file is corrupt or truncated") from e


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_state_dict_with_report(model: torch.nn.Module, state_dict: dict, strict: bool = False) -> ConversionReport:
    """Load ``state_dict`` into ``model``; a shape mismatch raises, missing/unexpected are reported
    (and raise when ``strict``)."""
    own = model.state_dict()
    report = ConversionReport()
    usable = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unused.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            usable[k] = v
            report.mapped.append((k, k))
    report.missing = [k for k in own if k not in usable]
    if report.mismatched:
        raise CheckpointError("checkpoint does not fit the model:\n" + report.summary())
    if strict and (report.missing or report.unused):
        raise CheckpointError("strict load failed:\n" + report.summary())
    model.load_state_dict(usable, strict=False)
    return report
