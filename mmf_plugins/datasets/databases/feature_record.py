"""The feature record (one image's region features) and what every feature store shares.

A record is the dict extractors produce, writers write and feature databases return
(ARCHITECTURE.md "Contracts"):

====================  =====================  ================================================
key                   type                   meaning
====================  =====================  ================================================
features              float32 [N, D]         RoI features (D=2048 for detectors; no box dims)
num_boxes             int                    N
bbox                  float32 [N, 4]         x1, y1, x2, y2 in original-image pixels
image_width/height    int                    original image size
objects               int64 [N]              detector class ids
object_names          list[str]              class names (optional)
scores                float32 [N]            detection confidence (optional)
cls_prob              float32 [N, C]         class distribution (optional)
attributes            int64 [N, A]           attribute ids (optional)
attribute_names       list[list[str]]        attribute names (optional)
attr_scores           float32 [N, A]         attribute confidences (optional)
bbox_normalized       bool                   only when True: bbox is in [0, 1] image units and
                                             image_width = image_height = 1 (source had no size)
====================  =====================  ================================================

Readers return numpy arrays (zero-copy where the store allows); ``pad_features`` turns a record into
the padded torch tensors datasets put into a ``Sample``. The 2054-d OSCAR/VinVL form is
``features ‖ [x1/W, y1/H, x2/W, y2/H, w/W, h/H]`` (microsoft/Oscar issue #10); ``oscar_box_dims``
and ``split_oscar_features`` convert to and from it.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmf_plugins.processors.bbox_processors import oscar_box_features

logger = logging.getLogger(__name__)

ARRAY_FIELDS = {  # key -> (dtype, ndim); first dim is N
    "features": (np.float32, 2),
    "bbox": (np.float32, 2),
    "objects": (np.int64, 1),
    "scores": (np.float32, 1),
    "cls_prob": (np.float32, 2),
    "attributes": (np.int64, 2),
    "attr_scores": (np.float32, 2),
}
INT_FIELDS = ("num_boxes", "image_width", "image_height")
NAME_FIELDS = ("object_names", "attribute_names")
RECORD_KEYS = frozenset(ARRAY_FIELDS) | frozenset(INT_FIELDS) | frozenset(NAME_FIELDS) | {"bbox_normalized"}
OSCAR_BOX_DIMS = 6


class FeatureReadError(OSError):
    """A feature record that cannot be read: truncated or corrupt file, wrong shape or dimension."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"cannot read features from {where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):  # keep (where, reason) through pickling (DataLoader workers)
        return (type(self), (self.where, self.reason))


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_record(record: dict, where: str, feature_dim: int | None = None, error=FeatureReadError) -> dict:
    """Validate and normalise ``record`` (dtypes, shapes, N agreement); returns a new dict of known keys.

    Raises ``error(where, reason)`` (``FeatureReadError`` for readers; writers pass a ``ValueError``
    maker) naming the offending key, its shape and the expected one.
    """
    if "features" not in record:
        raise error(where, f"record has no 'features' (keys: {', '.join(map(str, record))})")

    def as_int(key: str, value: Any) -> int:
        try:
            return int(to_numpy(value))
        except (TypeError, ValueError):
            raise error(where, f"'{key}' must be an integer, got {value!r}") from None

    out: dict[str, Any] = {}
    for key, (dtype, ndim) in ARRAY_FIELDS.items():
        if key not in record or record[key] is None:
            continue
        arr = to_numpy(record[key])
        if arr.ndim != ndim:
            raise error(where, f"'{key}' has shape {tuple(arr.shape)}; expected {ndim} dims")
        if arr.dtype != dtype:
            try:
                arr = arr.astype(dtype)
            except (TypeError, ValueError):
                raise error(where, f"'{key}' of dtype {arr.dtype} is not convertible to {np.dtype(dtype)}") from None
        out[key] = arr
    n = out["features"].shape[0]
    for key, arr in out.items():
        if arr.shape[0] != n:
            raise error(where, f"'{key}' has {arr.shape[0]} rows but features has {n}")
    if "bbox" in out and out["bbox"].shape[1] != 4:
        raise error(where, f"'bbox' has shape {tuple(out['bbox'].shape)}; expected ({n}, 4) xyxy")
    if feature_dim is not None and out["features"].shape[1] != int(feature_dim):
        raise error(where, f"features are {out['features'].shape[1]}-d; expected feature_dim={feature_dim}")
    num_boxes = as_int("num_boxes", record.get("num_boxes", n))
    if num_boxes != n:
        raise error(where, f"num_boxes={num_boxes} but features has {n} rows")
    out["num_boxes"] = n
    for key in ("image_width", "image_height"):
        if record.get(key) is not None:
            out[key] = as_int(key, record[key])
    for key in NAME_FIELDS:
        if record.get(key) is not None:
            names = list(record[key])
            if len(names) != n:
                raise error(where, f"'{key}' has {len(names)} entries but features has {n} rows")
            out[key] = [str(x) for x in names] if key == "object_names" else [[str(a) for a in x] for x in names]
    if record.get("bbox_normalized"):
        out["bbox_normalized"] = True
    return out


def writer_error(where: str, reason: str) -> ValueError:
    return ValueError(f"invalid feature record for image {where}: {reason}")


def candidate_keys(image_id: Any) -> list[str]:
    """Keys to try for an image id: as given, then MMF's ``str(int(stem.split("_")[-1]))`` form."""
    key = str(image_id)
    keys = [key]
    m = re.search(r"_(\d+)$", key)
    if m:
        alt = str(int(m.group(1)))
        if alt != key:
            keys.append(alt)
    return keys


# --------------------------------------------------------------- OSCAR 2054-d form
def oscar_box_dims(bbox: np.ndarray, width: float, height: float) -> np.ndarray:
    """``[N, 6]`` float32 ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`` from pixel ``xyxy`` boxes
    (numpy face of ``processors.bbox_processors.oscar_box_features``)."""
    bbox = torch.from_numpy(np.ascontiguousarray(to_numpy(bbox), dtype=np.float32))
    return oscar_box_features(bbox, width, height).numpy()


def split_oscar_features(
    feats: np.ndarray, width: int | None, height: int | None, where: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split ``[N, D+6]`` OSCAR features into ``(features [N, D], bbox [N, 4], normalized)``.

    With the image size known the box is scaled back to pixels; otherwise it stays in [0, 1] units and
    ``normalized`` is True.
    """
    if feats.ndim != 2 or feats.shape[1] <= OSCAR_BOX_DIMS:
        raise FeatureReadError(where, f"features of shape {tuple(feats.shape)} have no room for 6 box dims")
    features = feats[:, :-OSCAR_BOX_DIMS]
    norm = np.array(feats[:, -OSCAR_BOX_DIMS:-2], dtype=np.float32)
    if width and height:
        return features, norm * np.array([width, height, width, height], dtype=np.float32), False
    return features, norm, True


# ---------------------------------------------------------------- reader interface
class FeatureDatabase(abc.ABC):
    """Read-only map image id -> record. Lazy: nothing is cached per record."""

    path: str

    @abc.abstractmethod
    def get(self, image_id: Any) -> dict:
        """The record of ``image_id``; ``KeyError`` when absent, ``FeatureReadError`` when unreadable."""

    @abc.abstractmethod
    def __contains__(self, image_id: Any) -> bool: ...

    @abc.abstractmethod
    def keys(self) -> Iterator[str]:
        """Image ids in store order."""

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def __getitem__(self, image_id: Any) -> dict:
        return self.get(image_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Release open handles (they reopen on the next access)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def missing_key(image_id: Any, path: str) -> KeyError:
    return KeyError(f"image id '{image_id}' not found in feature store {path} (tried {', '.join(candidate_keys(image_id))})")


# ------------------------------------------------------------------------ padding
def pad_features(record: dict, max_features: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pad/truncate a record to ``max_features`` regions for a ``Sample``.

    Returns ``(features [max_features, D] float32, mask [max_features] bool (True = real region),
    info)``. ``info`` holds ``bbox`` [max_features, 4], ``num_boxes`` and ``max_features`` (both the
    real, kept count, as MMF's reader and the ``bbox`` processor give it), ``image_width``,
    ``image_height``, and when present ``objects``, ``scores``, ``cls_prob``, ``attributes``,
    ``attr_scores`` (zero-padded like MMF; ``mask`` tells real rows), ``object_names`` /
    ``attribute_names`` (kept rows only) and ``bbox_normalized``.
    """
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}")
    feats = to_numpy(record["features"])
    n = min(int(feats.shape[0]), int(max_features))
    features = torch.zeros(max_features, feats.shape[1], dtype=torch.float32)
    features.numpy()[:n] = feats[:n]  # one copy, straight from the (possibly memory-mapped) source
    mask = torch.zeros(max_features, dtype=torch.bool)
    mask[:n] = True
    info: dict[str, Any] = {
        "num_boxes": n,
        "max_features": n,
        "image_width": int(record.get("image_width", 0) or 0),
        "image_height": int(record.get("image_height", 0) or 0),
    }
    for key, (dtype, _) in ARRAY_FIELDS.items():
        if key == "features" or record.get(key) is None:
            continue
        arr = to_numpy(record[key])[:n]
        padded = np.zeros((max_features, *arr.shape[1:]), dtype=dtype)
        padded[:n] = arr
        info[key] = torch.from_numpy(padded)
    if "bbox" not in info:
        info["bbox"] = torch.zeros(max_features, 4, dtype=torch.float32)
    for key in NAME_FIELDS:
        if record.get(key) is not None:
            info[key] = list(record[key][:n])
    if record.get("bbox_normalized"):
        info["bbox_normalized"] = True
    return features, mask, info
