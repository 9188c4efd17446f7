"""Inference pipelines in the style of Hugging Face ``pipeline``: image + question in, answers out.

    from mmf_plugins import pipeline
    vqa = pipeline("vqa", model="soho", checkpoint="save/soho_vqa")      # a run's save_dir
    vqa("photo.jpg", "what color is the circle?")  # -> [{"answer": "red", "score": 0.93}]

``checkpoint`` is a run directory (its ``config.yaml`` + ``<model>_final.safetensors`` or
``best.ckpt``/``current.ckpt``) or a weights file with ``config=`` the run's yaml; ``zoo=`` loads a
zoo entry through its converter instead. The text, answer, image and bbox processors are the ones the
run was trained with (from its dataset config), so inputs are formed exactly as in training. Region
models run the feature extractor recorded in ``dataset_config.<d>.feature_extractor`` (``{type,
params}``; the demo records its shapes detector there) before the model: latency measured through a
pipeline is end to end (image in, answer out). Batched; ``device`` and ``precision`` arguments.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


class PipelineInputError(ValueError):
    """An image or question the pipeline cannot use."""


def _find_weights(run_dir: Path, model: str) -> Path:
    for name in (f"{model}_final.safetensors", "best.ckpt", "current.ckpt"):
        if (run_dir / name).exists():
            return run_dir / name
    raise FileNotFoundError(f"no weights in {run_dir}: expected {model}_final.safetensors, best.ckpt or current.ckpt "
                            "(a finished mmf_run writes them)")


def _to_uint8_image(image) -> torch.Tensor:
    from mmf_plugins.datasets.databases.image_database import ImageDatabase

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise PipelineInputError(f"image file not found: {path}")
        return ImageDatabase(path.parent).load(path.name)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise PipelineInputError(f"image tensor must be [3,H,W] (uint8 0-255 or float 0-1), got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return image.expand(3, -1, -1).contiguous()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    raise PipelineInputError(f"unsupported image type {type(image).__name__}; give a path, a PIL image or a [3,H,W] tensor")


class VQAPipeline:
    task = "vqa"

    def __init__(self, model: str | None = None, checkpoint: str | None = None, zoo: str | None = None,
                 config: str | DictConfig | None = None, dataset: str | None = None, device: str = "cpu",
                 precision: str = "fp32", extractor: dict | None = None):
        from mmf_plugins import setup_imports
        from mmf_plugins.common.registry import registry
        from mmf_plugins.datasets.builders.vl_builder import data_root
        from mmf_plugins.models.base_model import build_model
        from mmf_plugins.processors.base_processor import build_processor

        setup_imports()
        run_dir = Path(checkpoint) if checkpoint and Path(checkpoint).is_dir() else None
        if config is None and run_dir is not None:
            config = run_dir / "config.yaml"
        if config is None:
            raise ValueError("pipeline needs the run's config: pass checkpoint=<save_dir> or config=<config.yaml>")
        cfg = config if isinstance(config, DictConfig) else OmegaConf.load(str(config))
        self.config = cfg
        self.model_name = model or cfg.model
        if model and cfg.model and model != cfg.model:
            raise ValueError(f"pipeline model='{model}' but the run was trained with model='{cfg.model}'")
        self.dataset = dataset or str(cfg.datasets).split(",")[0]
        ds_cfg = cfg.dataset_config[self.dataset]
        self.ds_cfg = ds_cfg
        builder_cls = registry.get_builder_class(self.dataset)
        builder_cls(self.dataset).update_registry_for_model(ds_cfg)
        extra = {"data_dir": str(data_root(ds_cfg)), "dataset_type": "test"}
        procs = ds_cfg.processors
        self.text_processor = build_processor(procs.text_processor, **extra)
        self.answer_processor = registry.get(f"{self.dataset}_answer_processor")
        self.use_images = bool(ds_cfg.get("use_images", False))
        self.use_features = bool(ds_cfg.get("use_features", False))
        self.image_processor = build_processor(procs.image_processor, **extra) if self.use_images else None
        self.bbox_processor = build_processor(procs.bbox_processor, **extra) if self.use_features else None
        self.max_features = int(ds_cfg.get("max_features", 50))
        self.device = torch.device(device)
        self.precision = precision
        self.model = build_model(self.model_name, cfg.model_config[self.model_name])
        if zoo:
            from mmf_plugins.zoo.loading import load_zoo_weights

            load_zoo_weights(zoo, self.model, cfg)
        else:
            from mmf_plugins.zoo.conversion import load_state_dict_with_report, load_weights_file

            weights = _find_weights(run_dir, self.model_name) if run_dir else Path(checkpoint)
            state = load_weights_file(weights)
            state = state.get("model", state) if isinstance(state, dict) else state
            report = load_state_dict_with_report(self.model, state)
            if report.missing:
                logger.warning("weights %s leave %d model keys unfilled: %s", weights, len(report.missing), report.missing[:5])
        self.model.eval().to(self.device)
        self.extractor = None
        if self.use_features:
            spec = extractor or ds_cfg.get("feature_extractor", None)
            if not spec:
                raise ValueError(f"model '{self.model_name}' reads region features: give extractor={{type, params}} or record "
                                 f"dataset_config.{self.dataset}.feature_extractor in the run config")
            spec = OmegaConf.to_container(OmegaConf.create(spec), resolve=True) if not isinstance(spec, dict) else spec
            if "type" not in spec:
                raise ValueError(f"feature_extractor of dataset '{self.dataset}' needs a 'type' (a registered extractor), got {spec}")
            self.extractor = registry.get_extractor_class(spec["type"])(**(spec.get("params") or {}))

    # ------------------------------------------------------------------ call
    def _autocast(self):
        if self.precision in ("bf16", "bf16-mixed"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision in ("fp16", "16-mixed") and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def preprocess(self, images: Sequence, questions: Sequence[str]):
        from mmf_plugins.common.sample import Sample, collate
        from mmf_plugins.datasets.builders.vl_dataset import tags_from_record, text_b_for

        pix = [_to_uint8_image(im) for im in images]
        records = None
        if self.extractor is not None:
            with torch.no_grad(), self._autocast():
                records = self.extractor(pix, None)
        samples = []
        for i, (img, q) in enumerate(zip(pix, questions)):
            if not isinstance(q, str) or not q.strip():
                raise PipelineInputError(f"question {i} is empty; give a non-empty string")
            s, tags = Sample(id=i), None
            if self.image_processor is not None:
                out = self.image_processor({"image": img, "text": q})
                s["image"] = out["image"]
            if records is not None:
                out = self.bbox_processor(dict(records[i]))
                s["image_feature_0"], s["image_info_0"] = out["image_feature_0"], out["image_info_0"]
                tags = tags_from_record(records[i], self.max_features)
            s.update(self.text_processor({"text": q, "text_b": text_b_for(self.ds_cfg, tags)}))
            samples.append(s)
        return collate(samples, self.dataset, "test").to(self.device)

    @torch.no_grad()
    def __call__(self, images, questions, top_k: int = 1, batch_size: int = 16) -> Any:
        single = isinstance(questions, str)
        if single:
            images, questions = [images], [questions]
        if len(images) != len(questions):
            raise PipelineInputError(f"got {len(images)} images and {len(questions)} questions; give one question per image")
        results = []
        for start in range(0, len(questions), batch_size):
            batch = self.preprocess(images[start:start + batch_size], questions[start:start + batch_size])
            with self._autocast():
                scores = self.model(batch)["scores"].float()
            vals_t, idx_t = self.answer_processor.predict_indices(scores, top_k)
            for vals, idxs in zip(torch.sigmoid(vals_t).tolist(), idx_t.tolist()):
                results.append([{"answer": self.answer_processor.idx2word(i), "score": v} for i, v in zip(idxs, vals)])
        return results[0] if single else results


TASKS = {"vqa": VQAPipeline}


def pipeline(task: str, **kwargs) -> VQAPipeline:
    if task not in TASKS:
        raise KeyError(f"unknown pipeline task '{task}'; available: {', '.join(TASKS)}")
    return TASKS[task](**kwargs)
