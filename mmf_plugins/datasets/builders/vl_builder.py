"""The builder every vision-language dataset key uses: paths, file checks, the `shapes` fallback.

A dataset config names files relative to ``data_dir`` (default ``${env.data_dir}``). ``build`` checks
every file and folder the enabled modes need (annotations always; ``images`` when ``use_images``;
``features`` when ``use_features``). The defaults point at the generated ``shapes`` corpus under
``<data_dir>/shapes``: when those files are missing the corpus is generated (as MMF downloads a
dataset on first use). A missing file of a real dataset raises ``DatasetFileMissing`` naming the
dataset key, the exact path, and where the file comes from (the dataset zoo entry and its URLs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.base_dataset_builder import BaseDatasetBuilder, DatasetFileMissing

logger = logging.getLogger(__name__)

SHAPES_DIRNAME = "shapes"


def data_root(config: DictConfig) -> Path:
    d = config.get("data_dir", None)
    if not d:
        from mmf_plugins.common.config import resolve_dir

        d = resolve_dir("MMF_DATA_DIR", "data")
    return Path(os.path.expanduser(str(d)))


def resolve(config: DictConfig, rel: str | None) -> Path | None:
    if rel is None:
        return None
    p = Path(os.path.expanduser(str(rel)))
    return p if p.is_absolute() else data_root(config) / p


def ensure_shapes(config: DictConfig) -> Path:
    """Generate the shapes corpus under ``<data_dir>/shapes`` if it is not built yet."""
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    out = data_root(config) / SHAPES_DIRNAME
    params = config.get("shapes", None) or {}
    kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(params)).items() if k in ("seed", "num_images")}
    return generate_shapes(out, **kwargs)


class VLDatasetBuilder(BaseDatasetBuilder):
    """Subclasses set ``dataset_class`` and ``config_path``; ``required_files(config, split)`` may add files."""

    dataset_class = None
    zoo_key: str | None = None  # dataset zoo entry with the official download
    source_hint = ""

    def __init__(self, dataset_name: str | None = None):
        super().__init__(dataset_name or self.default_name)

    default_name = "dataset"

    # ------------------------------------------------------------------ files
    def splits_files(self, config: DictConfig, split: str) -> list[Path]:
        files = []
        ann = (config.get("annotations", None) or {}).get(split)
        if ann is None:
            return files
        if isinstance(ann, (DictConfig, dict)):
            files += [resolve(config, v) for k, v in ann.items() if v and not str(k).startswith("optional")]
        else:
            files.append(resolve(config, ann))
        if config.get("use_images", False) and (config.get("images", None) or {}).get(split):
            files.append(resolve(config, config.images[split]))
        if config.get("use_features", False) and (config.get("features", None) or {}).get(split):
            files.append(resolve(config, config.features[split]))
        return files

    def build(self, config: DictConfig) -> None:
        missing = [p for split in ("train", "val", "test") for p in self.splits_files(config, split) if not p.exists()]
        missing = list(dict.fromkeys(missing))
        shapes_root = data_root(config) / SHAPES_DIRNAME
        # the embedded default corpus generates itself (its region features come from mmf_extract_features)
        generatable = [p for p in missing if shapes_root in p.parents and "features" not in p.relative_to(shapes_root).parts]
        # generating helps only when every missing file (features aside) belongs to the corpus
        if generatable and all(shapes_root in p.parents for p in missing):
            logger.info("generating the shapes corpus at %s", shapes_root)
            ensure_shapes(config)
            missing = [p for p in missing if not p.exists()]
        if missing:
            raise DatasetFileMissing(self.missing_message(config, missing))

    def missing_message(self, config: DictConfig, missing: list[Path]) -> str:
        lines = [f"dataset '{self.dataset_name}' is missing {len(missing)} file(s):"]
        lines += [f"  {p}" for p in missing[:10]]
        if any("features" in p.parts for p in missing):
            lines.append("region features are made with: mmf_extract_features --image_dir <images> "
                         "--output_folder <features> --writer lmdb (see README 'Feature extraction'), or set "
                         f"dataset_config.{self.dataset_name}.use_features=False")
        if self.zoo_key:
            lines.append(f"download them with: mmf_zoo download {self.zoo_key} (or fetch the official files "
                         f"yourself: {self.source_hint}) and put them under data_dir={data_root(config)}")
        elif self.source_hint:
            lines.append(f"source: {self.source_hint}")
        lines.append(f"or point dataset_config.{self.dataset_name}.data_dir / .annotations / .images at your copy")
        return "\n".join(lines)

    # ------------------------------------------------------------------- load
    def load(self, config: DictConfig, split: str):
        ann = (config.get("annotations", None) or {}).get(split)
        if ann is None:
            logger.info("dataset '%s' has no '%s' split configured; skipped", self.dataset_name, split)
            return None
        return self.dataset_class(self.dataset_name, config, split)

    def update_registry_for_model(self, config: DictConfig) -> None:
        procs = config.get("processors", None) or {}
        if "answer_processor" in procs:
            from mmf_plugins.processors.base_processor import build_processor

            ap = build_processor(procs.answer_processor, data_dir=str(data_root(config)))
            registry.register(f"{self.dataset_name}_answer_processor", ap)
            registry.register(f"{self.dataset_name}_num_final_outputs", len(ap))
        if "text_processor" in procs:
            registry.register(f"{self.dataset_name}_text_processor_config", procs.text_processor)
