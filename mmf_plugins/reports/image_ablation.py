"""Does a trained model look at the image? Its val metrics with the visual input intact, zeroed and shuffled.

A VQA model can pass the text-only prior (most frequent answer per question type) on the question alone: the
question's words say more than its type. Accuracy above the prior therefore does not show that a model reads the
image; this check does. Each mode is one evaluation pass over the split with the run's own config and weights:

* ``intact``: the batches as the dataset gives them (equals the run's logged val metric);
* ``zeroed``: every visual tensor set to zeros: pixels (``image``) and region features (``image_feature_<i>``);
  boxes, image sizes and text (VinVL's detector tags included) are kept;
* ``shuffled``: the visual side of the batch moved to other samples: every ``image*`` field but ``image_id``
  (pixels with their ``image_mask``, region features with every per-sample field of ``image_info_<i>``: boxes,
  counts, class scores). Rows are sorted by ``image_id`` and rolled by the
  largest number of rows one image has in the batch, so each question is asked about another image whenever the
  batch holds more than twice that many rows (VQA files list an image's questions together, so a plain random
  permutation would often hand a question its own image back).

A model that uses the image loses accuracy in both ablations; one that matches its intact score ignores it.
Measured on one ``make demo`` run (shapes val VQA accuracy, intact / zeroed / shuffled; text-only prior 41.39):

  ========  =====  =====  =====
  soho      44.68  44.67  44.68   the grid model answers from the question alone
  vinvl     46.29  46.39  44.52   region content unused (the region count still matters a little)
  vl_bert   59.18  48.35  41.83   reads the regions
  ========  =====  =====  =====

Not in MMF or the original repositories; ``tools/image_ablation.py`` is the command line.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from mmf_plugins.reports.comparison import RunNotReadable

MODES = ("intact", "zeroed", "shuffled")
_PIXELS_OR_FEATURES = re.compile(r"^image(_feature_\d+|_\d+)?$")


def _is_visual_key(key: str) -> bool:
    """Pixels (``image``, NLVR2's ``image_<i>``) or region features (``image_feature_<i>``)."""
    return bool(_PIXELS_OR_FEATURES.match(key))


def _permute(value, order: torch.Tensor, batch_size: int):
    if isinstance(value, torch.Tensor):
        return value[order.to(value.device)] if value.dim() and value.size(0) == batch_size else value
    if isinstance(value, list) and len(value) == batch_size:
        return [value[int(i)] for i in order]
    if isinstance(value, dict):
        return type(value)({k: _permute(v, order, batch_size) for k, v in value.items()})
    return value


def other_image_order(image_ids, batch_size: int) -> torch.Tensor:
    """Row order that gives each row the visual input of a row with another image id (see ``shuffled``)."""
    if image_ids is None or len(image_ids) != batch_size:
        return torch.roll(torch.arange(batch_size), 1)
    keys = [str(x.item() if isinstance(x, torch.Tensor) else x) for x in image_ids]
    rows = sorted(range(batch_size), key=lambda i: keys[i])
    shift = max(keys.count(k) for k in set(keys))
    order = torch.arange(batch_size)
    for j, row in enumerate(rows):
        order[row] = rows[(j + shift) % batch_size]
    return order


def ablate_batch(batch, mode: str):
    """``batch`` (a SampleList / dict) with its visual input changed as ``mode`` says; changed in place and returned."""
    if mode not in MODES:
        raise ValueError(f"image ablation mode must be one of {MODES}, got {mode!r}")
    if mode == "intact":
        return batch
    keys = [k for k in list(batch.keys()) if _is_visual_key(k) and isinstance(batch[k], torch.Tensor)]
    if not keys:
        raise KeyError(f"the batch has no visual input to ablate (expected 'image' or 'image_feature_<i>'); keys: {sorted(batch.keys())}")
    if mode == "zeroed":
        for k in keys:
            batch[k] = torch.zeros_like(batch[k])
        return batch
    B = batch[keys[0]].size(0)
    order = other_image_order(batch.get("image_id"), B)
    for k in list(batch.keys()):  # pixels with their masks, features with their image_info; the question keeps its id
        if k.startswith("image") and k != "image_id":
            batch[k] = _permute(batch[k], order, B)
    return batch


class _AblatedForward:
    """Wraps ``model.forward`` so every batch is ablated before the model sees it."""

    def __init__(self, model, mode: str):
        self.mode = mode
        self.forward = model.forward

    def __call__(self, batch):
        return self.forward(ablate_batch(batch, self.mode))


def image_ablation(run_dir: str | Path, modes=MODES, split: str = "val", overrides: list[str] | None = None,
                   max_batches: int | None = None) -> dict[str, dict[str, float]]:
    """Evaluate the run in ``run_dir`` (an ``mmf_run`` save_dir) once per mode: ``{mode: {metric: value}}``
    with the metrics the run logs (``<split>/<dataset>/<metric>``, losses included)."""
    from omegaconf import OmegaConf

    from mmf_plugins.common.config import build_config
    from mmf_plugins.pipelines import _find_weights
    from mmf_plugins.trainers.evaluation import evaluate
    from mmf_plugins.trainers.mmf_trainer import LightningTrainer

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"image ablation modes must be among {MODES}, got {unknown}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise RunNotReadable(f"{run_dir} is not an mmf_run save_dir: config.yaml is missing")
    saved = OmegaConf.load(run_dir / "config.yaml")
    try:  # the weights the pipeline reads: <model>_final.safetensors (the best model) first
        weights = _find_weights(run_dir, str(saved.model))
    except FileNotFoundError as e:
        raise RunNotReadable(str(e)) from e
    with tempfile.TemporaryDirectory(prefix="image_ablation_") as tmp:
        opts = [f"config={run_dir / 'config.yaml'}", f"model={saved.model}", f"datasets={saved.datasets}",
                "run_type=val", f"env.save_dir={tmp}", f"checkpoint.resume_file={weights}", "checkpoint.resume=false",
                *(overrides or [])]
        trainer = LightningTrainer(build_config(opts))
        trainer.load()
        model = trainer.model
        loaders = trainer.data.eval_dataloaders(split)
        results = {}
        for mode in modes:
            model.__dict__.pop("forward", None)  # the class's forward again
            if mode != "intact":
                model.forward = _AblatedForward(model, mode)
            values, _ = evaluate(model, loaders, trainer.config, split, torch.device("cpu"), max_batches=max_batches)
            results[mode] = values
        model.__dict__.pop("forward", None)
    return results


def ablation_table(rows: list[tuple[str, str, dict[str, dict[str, float]]]]) -> str:
    """Markdown table of ``(run name, metric key, image_ablation result)`` rows, metrics in percent."""
    lines = ["| run | metric | intact | zeroed | shuffled |", "|---|---|---|---|---|"]
    for name, key, res in rows:
        cells = [f"{100 * res[m][key]:.2f}" if m in res and key in res[m] else "-" for m in MODES]
        lines.append(f"| {name} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
