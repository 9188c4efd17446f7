"""What every vision-language dataset shares: one image id -> pixels or region features, text -> tokens.

The same annotations serve a grid model (``use_images``: the image is decoded by ``ImageDatabase``
and resized/normalized by ``image_processor``, giving ``image``) and region models (``use_features``:
the record from the feature database is padded by ``bbox_processor``, giving ``image_feature_0`` and
``image_info_0``, and the detector's object names become ``tags``). Both can be on at once.

Image files are named by ``image_name_format`` (``str.format`` with ``image_id`` and ``split``; e.g.
``COCO_{split}2014_{image_id:012d}.jpg`` for COCO, ``shapes_{split}_{image_id:012d}.jpg`` for shapes);
feature records are keyed by the file's stem, as MMF's ``.npy`` feature folders and
``mmf_extract_features`` name them. Slot ``k`` (NLVR2's second image) gets ``image_k`` /
``image_feature_k`` / ``image_info_k``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from mmf_plugins.datasets.base_dataset import BaseDataset
from mmf_plugins.datasets.builders.vl_builder import data_root, resolve

logger = logging.getLogger(__name__)


class VisionLanguageDataset(BaseDataset):
    def __init__(self, dataset_name: str, config: DictConfig, dataset_type: str):
        super().__init__(dataset_name, config, dataset_type)
        self.data_dir = data_root(config)
        self.use_images = bool(config.get("use_images", False))
        self.use_features = bool(config.get("use_features", False))
        if not (self.use_images or self.use_features):
            raise ValueError(f"dataset '{dataset_name}': set use_images=True (grid models) or use_features=True "
                             "(region models) in dataset_config")
        self.image_name_format = str(config.get("image_name_format", "{image_id}.jpg"))
        self.image_split_name = str((config.get("image_split_names", None) or {}).get(dataset_type, dataset_type))
        self._image_db = None
        self._feature_db = None
        self.max_features = int(config.get("max_features", 50))
        self.init_processors(data_dir=str(self.data_dir), dataset_type=dataset_type)

    # ------------------------------------------------------------- databases
    def _split_path(self, key: str, split: str | None = None) -> Path:
        node = self.config.get(key, None) or {}
        rel = node.get(split or self.dataset_type)
        if rel is None:
            raise KeyError(f"dataset_config.{self.dataset_name}.{key}.{split or self.dataset_type} is not set")
        return resolve(self.config, rel)

    @property
    def image_db(self):
        if self._image_db is None:
            from mmf_plugins.datasets.databases.image_database import ImageDatabase

            self._image_db = ImageDatabase(self._split_path("images"))
        return self._image_db

    @property
    def feature_db(self):
        if self._feature_db is None:
            from mmf_plugins.datasets.databases.feature_database import open_feature_database

            self._feature_db = open_feature_database(str(self._split_path("features")))
        return self._feature_db

    def image_file(self, image_id) -> str:
        if isinstance(image_id, str) and not image_id.isdigit():
            return image_id if "." in os.path.basename(image_id) else image_id + ".jpg"
        return self.image_name_format.format(image_id=int(image_id), split=self.image_split_name)

    def feature_key(self, image_id) -> str:
        return Path(self.image_file(image_id)).stem

    # --------------------------------------------------------------- visuals
    def load_visual(self, image_id, slot: int = 0, text: str | None = None) -> tuple[dict, str | None, str | None]:
        """Returns (sample fields, text (flipped left/right when the image was flipped), tags)."""
        fields: dict = {}
        tags = None
        if self.use_images:
            img = self.image_db.load(self.image_file(image_id))
            out = self.image_processor({"image": img, "text": text}) if hasattr(self, "image_processor") else {"image": img.float() / 255}
            fields["image" if slot == 0 else f"image_{slot}"] = out["image"]
            if text is not None and out.get("text") is not None:
                text = out["text"]
        if self.use_features:
            record = self.feature_db.get(self.feature_key(image_id))
            out = self.bbox_processor(dict(record))
            fields[f"image_feature_{slot}"] = out["image_feature_0"]
            fields[f"image_info_{slot}"] = out["image_info_0"]
            tags = tags_from_record(record, self.max_features)
        return fields, text, tags

    def text_b(self, tags: str | None) -> str | None:
        return text_b_for(self.config, tags)


def text_b_for(config: DictConfig, tags: str | None) -> str | None:
    """``text_b: tags`` (VinVL: detector tags as segment B), a literal (VL-BERT: "[MASK]"), or None."""
    mode = config.get("text_b", None)
    if mode is None or mode is False:
        return None
    if mode == "tags":
        return tags or ""
    return str(mode)


def tags_from_record(record: dict, max_features: int) -> str | None:
    names = record.get("object_names")
    if names is None:
        return None
    return " ".join(n.replace("_", " ") for n in list(names)[:max_features])
