"""Feature store as a folder of MMF ``<image_id>.npy`` + ``<image_id>_info.npy`` files.

Follows MMF's padded Faster R-CNN reader (``mmf/datasets/databases/readers/feature_readers.py``):
``<root>/<id>.npy`` holds ``[N, D]`` features and ``<root>/<id>_info.npy`` is ``np.save`` of a dict
(``bbox`` N x 4 pixels, ``num_boxes``, ``objects``, ``cls_prob``, ``image_width``, ``image_height``).
Also reads the VinVL extractor's output (MMF ``tools/scripts/features/extract_features_vinvl.py``):
``[N, 2054]`` features, info ``labels`` / ``scores`` / ``attr_labels`` / ``attr_scores`` and ``bbox``
as N x 6 normalized dims; with ``split_box_dims=True`` the 6 box dims are split off the features.
Legacy single-file dicts (``features`` or ``image_feat`` inside the ``.npy``) and 3-d ``H x W x C``
grid features (flattened to ``H*W x C``) are read as MMF does.

Deliberate differences: features are memory-mapped (``mmap=True``), ``_info.npy`` is unpickled with a
restricted unpickler (safe_pickle.py), and a truncated file or wrong dimension raises
``FeatureReadError`` naming the file instead of a numpy error. Only the top level of ``root`` is listed
by ``keys()``; ids with sub-folders (``train2014/COCO_...``) are still readable by ``get``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmf_plugins.datasets.databases.feature_record import (
    OSCAR_BOX_DIMS,
    FeatureDatabase,
    FeatureReadError,
    candidate_keys,
    check_record,
    missing_key,
    split_oscar_features,
)
from mmf_plugins.datasets.databases.safe_pickle import load_npy

INFO_SUFFIX = "_info.npy"
# info key -> record key (VinVL extractor names on the left where they differ)
_INFO_ALIASES = {
    "objects": ("objects", "labels"),
    "attributes": ("attributes", "attr_labels"),
    "scores": ("scores",),
    "cls_prob": ("cls_prob",),
    "attr_scores": ("attr_scores",),
    "object_names": ("object_names",),
    "attribute_names": ("attribute_names",),
    "image_width": ("image_width", "image_w"),
    "image_height": ("image_height", "image_h"),
    "num_boxes": ("num_boxes",),
}
_READ_ERRORS = (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError)


def npy_key(image_id: Any) -> str:
    """Image id -> file stem, refusing ids that would leave the folder."""
    key = str(image_id)
    key = key.removesuffix(".npy")
    parts = key.replace("\\", "/").split("/")
    if not key or os.path.isabs(key) or any(p in ("", ".", "..") for p in parts):
        raise KeyError(f"invalid image id {image_id!r} for a .npy feature folder: it must be a relative name without '..'")
    return key


class NpyFeatureDatabase(FeatureDatabase):
    """Read ``<root>/<id>.npy`` + ``<root>/<id>_info.npy``.

    Args:
        root: the feature folder.
        feature_dim: expected D (after splitting box dims); other sizes raise ``FeatureReadError``.
        split_box_dims: features carry 6 trailing OSCAR box dims (VinVL extractor output): split them off.
        mmap: memory-map the features (default) instead of reading them.
    """

    def __init__(self, root: str | os.PathLike, feature_dim: int | None = None, split_box_dims: bool = False, mmap: bool = True):
        self.path = os.fspath(root)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"feature folder not found: {self.path}")
        self.feature_dim = feature_dim
        self.split_box_dims = bool(split_box_dims)
        self.mmap_mode = "r" if mmap else None

    def _file(self, image_id: Any) -> str | None:
        for key in candidate_keys(npy_key(image_id)):
            path = os.path.join(self.path, key + ".npy")
            if os.path.isfile(path):
                return path
        return None

    def __contains__(self, image_id: Any) -> bool:
        try:
            return self._file(image_id) is not None
        except KeyError:
            return False

    def keys(self) -> Iterator[str]:
        with os.scandir(self.path) as it:
            for entry in it:
                name = entry.name
                if name.endswith(".npy") and not name.endswith(INFO_SUFFIX) and not name.startswith("."):
                    yield name[: -len(".npy")]

    def get(self, image_id: Any) -> dict:
        path = self._file(image_id)
        if path is None:
            raise missing_key(image_id, self.path)
        try:
            feats = load_npy(path, mmap_mode=self.mmap_mode)
        except _READ_ERRORS as e:
            raise FeatureReadError(path, f"{type(e).__name__}: {e}") from e
        info: dict = {}
        if isinstance(feats, dict):  # legacy: everything in one pickled dict
            info = feats
            feats = info.get("features", info.get("image_feat"))
            if feats is None:
                raise FeatureReadError(path, f"dict .npy without 'features'/'image_feat' (keys: {', '.join(map(str, info))})")
            feats = np.asarray(feats)
        if not isinstance(feats, np.ndarray):
            raise FeatureReadError(path, f"expected a numeric array, got {type(feats).__name__}")
        if feats.ndim == 3:  # H x W x C grid
            feats = feats.reshape(-1, feats.shape[-1])
        if feats.ndim != 2:
            raise FeatureReadError(path, f"features have shape {tuple(feats.shape)}; expected [N, D]")
        info_path = path[: -len(".npy")] + INFO_SUFFIX
        if os.path.isfile(info_path):
            try:
                info = load_npy(info_path)
            except _READ_ERRORS as e:
                raise FeatureReadError(info_path, f"{type(e).__name__}: {e}") from e
            if not isinstance(info, dict):
                raise FeatureReadError(info_path, f"expected np.save of a dict, got {type(info).__name__}")
        return check_record(record_from_info(feats, info, self.split_box_dims, path), path, self.feature_dim)


def record_from_info(feats: np.ndarray, info: dict, split_box_dims: bool, where: str) -> dict:
    """Record from ``[N, D]`` features and an MMF / VinVL-extractor info dict (see module docstring)."""
    record: dict[str, Any] = {}
    for key, aliases in _INFO_ALIASES.items():
        for alias in aliases:
            if info.get(alias) is not None:
                record[key] = info[alias]
                break
    if info.get("bbox_normalized"):
        record["bbox_normalized"] = True
    width, height = record.get("image_width"), record.get("image_height")
    bbox = info.get("bbox")
    if split_box_dims:
        feats, dims_bbox, normalized = split_oscar_features(feats, width, height, where)
        if bbox is None or np.shape(bbox)[-1] != 4:
            bbox = dims_bbox
            record["bbox_normalized"] = normalized
    elif bbox is not None and np.ndim(bbox) == 2 and np.shape(bbox)[-1] == OSCAR_BOX_DIMS:
        # VinVL info stores the normalized 6-d box; scale back to pixels when the size is known
        norm = np.asarray(bbox, dtype=np.float32)[:, :4]
        if width and height:
            bbox = norm * np.array([width, height, width, height], dtype=np.float32)
        else:
            bbox, record["bbox_normalized"] = norm, True
    if record.get("bbox_normalized"):
        record["image_width"] = record["image_height"] = 1
    record["features"] = feats
    if bbox is not None:
        record["bbox"] = bbox
    return record
