"""Official checkpoints into our models: pick the weights file, run the registered converter, load.

Follows MMF's ``checkpoint.resume_zoo`` path (``mmf/utils/checkpoint.py``: download the zoo entry,
take the checkpoint in its folder, load it into the freshly built model, warn on missing/unexpected).

Deliberate differences from MMF:

* the weights file is searched in the whole entry folder (archives often nest a folder, which made
  MMF fail with "None or multiple checkpoints files", issue #1174); none or several give a message
  listing what was found, and an entry picks one with ``weights_file`` (a glob);
* files are read only through ``load_weights_file`` (safetensors, or ``torch.load(weights_only=True)``);
* the official keys are mapped by the entry's registered converter
  (``convert(official, **options) -> (state_dict, ConversionReport)``). A converter with the attribute
  ``accepts_directory = True`` is given the folder holding the weights (for checkpoints whose config or
  label map sits beside them) instead of the loaded dict. What ``load_weights_file`` returns is passed
  as is: unwrapping ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers is the converter's job;
* loading returns one ``ConversionReport`` combining the converter's and the model's view, and a
  shape mismatch is an error (``load_state_dict_with_report``).

``save_safetensors`` writes a converted state dict for ``mmf_convert``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.zoo.conversion import CheckpointError, ConversionReport, load_state_dict_with_report, load_weights_file
from mmf_plugins.zoo.download import ensure_downloaded
from mmf_plugins.zoo.zoo_config import ZooError, get_zoo_entry

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".model")
# Files with weight-like suffixes that hold no model weights (trainer state, pickled arguments).
NON_WEIGHT_NAMES = ("training_args.bin", "optimizer.pt", "optimizer.pth", "scheduler.pt", "scheduler.pth")


class WeightsFileError(ZooError):
    """No weights file, or several where one was expected."""


class ConverterOutputError(ZooError, TypeError):
    """A converter that returned something other than (dict of tensors, ConversionReport)."""


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_weights_files(folder: str | os.PathLike, pattern: str = "") -> list[Path]:
    """Weights files under ``folder``: those matching the glob ``pattern`` (relative to the folder),
    or every file with a weights suffix, hidden folders and trainer-state files excluded."""
    folder = Path(folder)
    if pattern:
        found = [p for p in folder.glob(pattern) if p.is_file() and _visible(p, folder)]
    else:
        found = [
            p
            for p in folder.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(WEIGHT_SUFFIXES)
            and p.name not in NON_WEIGHT_NAMES
            and not p.name.startswith("rng_state")
            and _visible(p, folder)
        ]
    return sorted(found)


def select_weights_file(folder: str | os.PathLike, pattern: str = "", what: str = "") -> Path:
    """The single weights file under ``folder`` (see ``find_weights_files``); raises ``WeightsFileError``."""
    folder = Path(folder)
    found = find_weights_files(folder, pattern)
    what = what or str(folder)
    rule = f"matching weights_file '{pattern}'" if pattern else f"with a weights suffix ({', '.join(WEIGHT_SUFFIXES)})"
    if len(found) == 1:
        return found[0]
    if not found:
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and _visible(p, folder))
        shown = ", ".join(present[:30]) + (f", ... (+{len(present) - 30})" if len(present) > 30 else "")
        raise WeightsFileError(
            f"no weights file {rule} in {what} ({folder}); files present: {shown or '(none)'}. "
            "Set weights_file in the zoo entry or pass the checkpoint file itself"
        )
    listed = ", ".join(str(p.relative_to(folder)) for p in found)
    raise WeightsFileError(
        f"{len(found)} weights files {rule} in {what} ({folder}): {listed}. Choose one: set weights_file "
        "(a glob relative to the folder) in the zoo entry, or pass the checkpoint file itself"
    )


def get_converter(name: str) -> Callable:
    """The registered converter ``name`` (imports every registering module first if needed)."""
    converter = registry.get_converter(name, none_if_missing=True)
    if converter is None:
        import mmf_plugins

        mmf_plugins.setup_imports()
        converter = registry.get_converter(name)  # raises listing the registered converters
    return converter


def convert_checkpoint(
    converter_name: str, path: str | os.PathLike, weights_file: str = "", **options: Any
) -> tuple[dict, ConversionReport]:
    """Run converter ``converter_name`` on an official checkpoint file or folder.

    Directory converters (``accepts_directory = True``) get the folder holding the weights file (the
    given folder when it holds none or several; the parent when ``path`` is a file); others get the
    dict read by ``load_weights_file`` from ``path`` or from the one weights file under it."""
    converter = get_converter(converter_name)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    if getattr(converter, "accepts_directory", False):
        if path.is_file():
            source: Any = path.parent
        else:
            try:
                source = select_weights_file(path, weights_file).parent
            except WeightsFileError:
                source = path
    else:
        file = path if path.is_file() else select_weights_file(path, weights_file)
        source = load_weights_file(file)
    result = converter(source, **options)
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], dict)
        or not isinstance(result[1], ConversionReport)
    ):
        raise ConverterOutputError(
            f"converter '{converter_name}' must return (state_dict: dict, report: ConversionReport), "
            f"got {type(result).__name__}"
        )
    state_dict, report = result
    bad = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConverterOutputError(
            f"converter '{converter_name}' returned non-tensor values for keys: {', '.join(bad[:20])}"
        )
    return state_dict, report


def merge_reports(conversion: ConversionReport, loading: ConversionReport) -> ConversionReport:
    """One report: the model's view (mapped / missing / mismatched) plus the official keys the
    converter left unused and its notes."""
    return ConversionReport(
        mapped=list(loading.mapped),
        unused=list(conversion.unused) + list(loading.unused),
        missing=list(loading.missing),
        mismatched=list(conversion.mismatched) + list(loading.mismatched),
        notes=list(conversion.notes) + list(loading.notes),
    )


def load_zoo_weights(
    key: str,
    model: torch.nn.Module,
    config: Any = None,
    *,
    strict: bool = False,
    progress: bool = True,
    offline: bool | None = None,
    **converter_options: Any,
) -> ConversionReport:
    """Download (if needed) zoo entry ``key``, convert its official weights and load them into ``model``.

    Options for the converter come from the entry's ``converter_options`` updated by ``converter_options``.
    Returns the combined report; raises ``CheckpointError`` on shape mismatches (and on missing or
    unexpected keys when ``strict``)."""
    entry = get_zoo_entry(key, kind="models", config=config)
    if not entry.converter:
        raise ZooError(f"zoo entry '{entry.key}' names no converter; add `converter: <name>` to {entry.source_file}")
    folder = ensure_downloaded(entry, config=config, progress=progress, offline=offline)
    options = {**entry.converter_options, **converter_options}
    state_dict, conversion = convert_checkpoint(entry.converter, folder, entry.weights_file, **options)
    loading = load_state_dict_with_report(model, state_dict, strict=strict)
    report = merge_reports(conversion, loading)
    logger.info("loaded zoo entry %s (converter %s) from %s\n%s", entry.key, entry.converter, folder, report.summary())
    return report


def save_safetensors(state_dict: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a converted state dict as safetensors, atomically (temp file in the same folder + rename).

    Tensors are moved to CPU and made contiguous; tensors sharing storage with an earlier one (tied
    weights) are cloned, since safetensors stores each tensor on its own."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot save {key!r} to safetensors: {type(value).__name__} is not a tensor")
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        elif ptr:
            seen.add(ptr)
        tensors[key] = t.contiguous()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
