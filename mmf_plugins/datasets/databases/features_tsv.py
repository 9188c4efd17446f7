"""Feature store in VinVL/OSCAR TSV form: ``features.tsv`` + ``.lineidx`` (+ ``predictions.tsv``).

Formats (microsoft/Oscar ``oscar/utils/tsv_file.py``, pzzhang/VinVL DOWNLOAD.md,
scene_graph_benchmark ``tools/test_sg_net.py``):

* ``features.tsv`` rows ``image_id \\t num_boxes \\t base64(float32 [num_boxes * 2054])``; the
  captioning form ``image_id \\t {"num_boxes": N, "features": base64}`` is read too. 2054 = 2048 RoI
  feature + ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]``.
* ``X.lineidx`` beside ``X.tsv``: the byte offset of each row, one decimal per line.
* ``predictions.tsv`` (or ``label.tsv``, or ``<stem with feature->label>.tsv``) rows
  ``image_id \\t {"objects": [{"class", "rect", "conf", ...}], "image_h", "image_w"}`` or a bare list
  of objects. Our writer adds ``class_id``, ``attr_ids`` so ids survive the trip; official files carry
  class names, mapped to ids through an optional ``label_map`` json (``label_to_idx``,
  ``attribute_to_idx``), else -1.

Reading splits the 2054 form into the 2048-d features and a pixel box: the ``rect`` of the matching
prediction when it agrees with the 6 dims, else the normalized dims x image size; with no image size
the box stays normalized, ``bbox_normalized`` is True and ``image_width = image_height = 1``.
``cls_prob`` has no place in the TSV form and is not stored.

Deliberate differences from Oscar's ``TSVFile``: a missing or stale ``.lineidx`` is rebuilt in memory
from the data (vectorised newline search), rows are found by image id (``imageid2idx.json`` when
present, else the first column of each row), and a trailing partial row (a killed writer) is ignored.
File handles are opened per process on first access.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmf_plugins.datasets.databases.feature_record import (
    FeatureDatabase,
    FeatureReadError,
    candidate_keys,
    check_record,
    missing_key,
    oscar_box_dims,
    split_oscar_features,
)

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.tsv"
PREDICTION_FILES = ("predictions.tsv", "label.tsv")
_CHUNK = 1 << 22


# ----------------------------------------------------------------- line index
def lineidx_path(tsv_path: str) -> str:
    return os.path.splitext(tsv_path)[0] + ".lineidx"


def complete_size(path: str) -> int:
    """Bytes up to and including the last newline: what is left of the file without a partial row."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            pos = f.read(end - start).rfind(b"\n")
            if pos >= 0:
                return start + pos + 1
            end = start
    return 0


def scan_offsets(path: str, start: int, end: int) -> np.ndarray:
    """Row start offsets of the complete rows in ``path[start:end]`` (``end`` just after a newline)."""
    found = [np.zeros(1, dtype=np.int64) + start] if end > start else []
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            chunk = np.frombuffer(f.read(min(_CHUNK, end - pos)), dtype=np.uint8)
            if chunk.size == 0:
                break
            found.append(np.flatnonzero(chunk == 10).astype(np.int64) + pos + 1)
            pos += chunk.size
    offsets = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return offsets[offsets < end]  # the newline of the last row points at `end`, not at a row


def row_offsets(path: str, end: int | None = None) -> np.ndarray:
    """Offsets of the complete rows of ``path`` before ``end`` (default: its complete size).

    Uses ``X.lineidx`` for the rows it lists correctly and scans the data only after them.
    """
    end = complete_size(path) if end is None else end
    offsets = np.zeros(0, dtype=np.int64)
    idx = lineidx_path(path)
    if os.path.isfile(idx):
        with open(idx, "rb") as f:
            text = f.read()
        text = text[: text.rfind(b"\n") + 1]  # a partial last entry is dropped
        try:
            offsets = np.array(text.split(), dtype=np.int64)
        except ValueError:
            offsets = np.zeros(0, dtype=np.int64)
        offsets = offsets[offsets < end]
        if offsets.size and (offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or not _is_row_start(path, offsets[-1])):
            logger.warning("%s does not match %s; rebuilding it from the data", idx, path)
            offsets = np.zeros(0, dtype=np.int64)
    if offsets.size:
        with open(path, "rb") as f:
            f.seek(int(offsets[-1]))
            resume = int(offsets[-1]) + len(f.readline())
        return np.concatenate([offsets, scan_offsets(path, resume, end)])
    return scan_offsets(path, 0, end)


def _is_row_start(path: str, offset: int) -> bool:
    if offset == 0:
        return True
    with open(path, "rb") as f:
        f.seek(offset - 1)
        return f.read(1) == b"\n"


def write_lineidx(tsv_path: str, offsets: np.ndarray) -> None:
    """Write ``X.lineidx`` atomically."""
    path = lineidx_path(tsv_path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(f"{int(o)}\n" for o in offsets))
    os.replace(tmp, path)


def read_row(fh, offset: int, where: str) -> list[bytes]:
    fh.seek(offset)
    line = fh.readline()
    if not line.endswith(b"\n"):
        raise FeatureReadError(where, f"row at byte {offset} is truncated")
    return line[:-1].rstrip(b"\r").split(b"\t")


def first_columns(path: str, offsets: np.ndarray) -> list[str]:
    """The first column (image id) of each row."""
    ids = []
    with open(path, "rb") as f:
        for off in offsets.tolist():
            f.seek(off)
            head = f.read(256)
            tab = head.find(b"\t")
            if tab < 0:
                f.seek(off)
                head = f.readline()
                tab = head.find(b"\t")
            ids.append(head[: tab if tab >= 0 else len(head)].decode("utf-8").rstrip("\r\n"))
    return ids


# ------------------------------------------------------------------ row codecs
def encode_features_row(image_id: str, record: dict) -> bytes:
    """``id \\t N \\t base64(float32 [N, D+6])`` for a checked record with ``bbox`` and image size."""
    feats = np.asarray(record["features"], dtype=np.float32)
    dims = oscar_box_dims(record["bbox"], record["image_width"], record["image_height"])
    blob = np.ascontiguousarray(np.concatenate([feats, dims], axis=1), dtype=np.float32).tobytes()
    return f"{image_id}\t{feats.shape[0]}\t".encode() + base64.b64encode(blob) + b"\n"


def encode_prediction_row(image_id: str, record: dict) -> bytes:
    """``id \\t json{"objects": [...], "image_h", "image_w"}`` (sizes omitted for normalized boxes)."""
    n = record["num_boxes"]
    rects = np.asarray(record["bbox"], dtype=np.float32).tolist()
    ids = record["objects"].tolist() if record.get("objects") is not None else None
    names = record.get("object_names")
    scores = record["scores"].tolist() if record.get("scores") is not None else None
    attr_ids = record["attributes"].tolist() if record.get("attributes") is not None else None
    attr_names = record.get("attribute_names")
    attr_scores = record["attr_scores"].tolist() if record.get("attr_scores") is not None else None
    objects = []
    for i in range(n):
        obj: dict[str, Any] = {"class": names[i] if names is not None else str(ids[i] if ids is not None else "")}
        obj["rect"] = rects[i]
        if ids is not None:
            obj["class_id"] = ids[i]
        if scores is not None:
            obj["conf"] = scores[i]
        if attr_names is not None:
            obj["attributes"] = attr_names[i]
        if attr_ids is not None:
            obj["attr_ids"] = attr_ids[i]
        if attr_scores is not None:
            obj["attr_scores"] = attr_scores[i]
        objects.append(obj)
    payload: dict[str, Any] = {"objects": objects}
    if not record.get("bbox_normalized"):
        payload["image_h"], payload["image_w"] = record["image_height"], record["image_width"]
    return f"{image_id}\t".encode() + json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def decode_features_row(cols: list[bytes], where: str) -> np.ndarray:
    """``[N, D]`` float32 from a features row (3-column or captioning json form)."""
    try:
        if len(cols) == 3:
            n, blob = int(cols[1]), cols[2]
        elif len(cols) == 2 and cols[1][:1] == b"{":
            payload = json.loads(cols[1])
            n, blob = int(payload["num_boxes"]), payload["features"].encode()
        else:
            raise ValueError(f"expected 3 tab-separated columns, got {len(cols)}")
        raw = base64.b64decode(blob, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise FeatureReadError(where, f"malformed features row ({type(e).__name__}: {e})") from e
    if len(raw) % 4:
        raise FeatureReadError(where, f"{len(raw)} bytes of features is not a whole number of float32")
    arr = np.frombuffer(raw, dtype=np.float32)
    if n == 0:
        if arr.size:
            raise FeatureReadError(where, f"num_boxes=0 but the row holds {arr.size} floats")
        return arr.reshape(0, 0)
    if n < 0 or arr.size % n:
        raise FeatureReadError(where, f"{arr.size} floats do not split into num_boxes={n} rows")
    return arr.reshape(n, -1)


def _pad_ragged(rows: list[list], fill, dtype) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def predictions_fields(payload: Any, n: int, label_map: dict | None, where: str) -> dict:
    """Record fields (image size, boxes, classes, scores, attributes) from a predictions.tsv json."""
    if isinstance(payload, list):
        payload = {"objects": payload}
    if not isinstance(payload, dict) or not isinstance(payload.get("objects", []), list):
        raise FeatureReadError(where, 'expected {"objects": [...], "image_h", "image_w"} or a list of objects')
    out: dict[str, Any] = {}
    if payload.get("image_w") and payload.get("image_h"):
        out["image_width"], out["image_height"] = int(payload["image_w"]), int(payload["image_h"])
    objects = payload.get("objects") or []
    if len(objects) != n:
        if objects:
            logger.warning("%s: %d predicted objects for %d feature rows; ignoring the objects", where, len(objects), n)
        return out
    label_map = label_map or {}
    names = [str(o.get("class", "")) for o in objects]
    out["object_names"] = names
    if all("class_id" in o for o in objects):
        out["objects"] = np.array([o["class_id"] for o in objects], dtype=np.int64)
    else:
        to_idx = label_map.get("label_to_idx", {})
        out["objects"] = np.array([to_idx.get(c, -1) for c in names], dtype=np.int64)
    if all("conf" in o for o in objects):
        out["scores"] = np.array([o["conf"] for o in objects], dtype=np.float32)
    if all("rect" in o for o in objects):
        out["rects"] = np.array([o["rect"] for o in objects], dtype=np.float32).reshape(n, 4)
    if all("attributes" in o for o in objects):
        out["attribute_names"] = [[str(a) for a in o["attributes"]] for o in objects]
        if all("attr_ids" in o for o in objects):
            out["attributes"] = _pad_ragged([o["attr_ids"] for o in objects], -1, np.int64)
        elif label_map.get("attribute_to_idx"):
            to_idx = label_map["attribute_to_idx"]
            out["attributes"] = _pad_ragged([[to_idx.get(a, -1) for a in names_] for names_ in out["attribute_names"]], -1, np.int64)
    if all("attr_scores" in o for o in objects):
        out["attr_scores"] = _pad_ragged([o["attr_scores"] for o in objects], 0.0, np.float32)
    return out


# ---------------------------------------------------------------------- reader
class _TsvTable:
    """One TSV file: per-process handle, lazily built id -> offset index."""

    def __init__(self, path: str):
        self.path = path
        self._index: dict[str, int] | None = None
        self._ids: list[str] | None = None
        self._fh = None
        self._pid: int | None = None

    def index(self) -> dict[str, int]:
        if self._index is None:
            offsets = row_offsets(self.path)
            id_file = os.path.join(os.path.dirname(self.path), "imageid2idx.json")
            ids = None
            if os.path.basename(self.path) == FEATURES_FILE and os.path.isfile(id_file):
                with open(id_file) as f:
                    by_row = json.load(f)
                if len(by_row) == len(offsets):
                    ids = [None] * len(offsets)
                    for key, row in by_row.items():
                        ids[int(row)] = str(key)
            if ids is None or None in ids:
                ids = first_columns(self.path, offsets)
            self._ids = ids
            self._index = dict(zip(ids, offsets.tolist()))
        return self._index

    def ids(self) -> list[str]:
        self.index()
        return self._ids

    def handle(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")  # noqa: SIM115  (held until close())
            self._pid = os.getpid()
        return self._fh

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = self._pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"] = state["_pid"] = None
        return state


def find_predictions(features_path: str) -> str | None:
    folder, name = os.path.split(features_path)
    candidates = [os.path.join(folder, p) for p in PREDICTION_FILES]
    if "feature" in name:
        candidates += [os.path.join(folder, name.replace("features", w).replace("feature", w)) for w in ("label", "predictions")]
    return next((p for p in candidates if os.path.isfile(p) and p != features_path), None)


class TsvFeatureDatabase(FeatureDatabase):
    """Read a VinVL ``features.tsv`` (with ``.lineidx`` and an optional predictions file beside it).

    Args:
        path: the ``.tsv`` file, or a folder holding ``features.tsv``.
        feature_dim: expected D after splitting off the box dims (2048 for VinVL).
        predictions: predictions/label TSV path; ``"auto"`` (default) looks beside the features, ``None`` skips it.
        label_map: json with ``label_to_idx`` / ``attribute_to_idx`` (VinVL's VG-SGG dicts) for class ids.
        split_box_dims: rows are the OSCAR ``D + 6`` form (default True); False keeps rows whole.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        feature_dim: int | None = None,
        predictions: str | None = "auto",
        label_map: str | dict | None = None,
        split_box_dims: bool = True,
    ):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, FEATURES_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TSV feature file not found: {path}")
        self.path = path
        self.feature_dim = feature_dim
        self.split_box_dims = bool(split_box_dims)
        if predictions == "auto":
            predictions = find_predictions(path)
        elif predictions is not None and not os.path.isfile(predictions):
            raise FileNotFoundError(f"predictions TSV not found: {predictions}")
        self.predictions_path = predictions
        if isinstance(label_map, (str, os.PathLike)):
            with open(label_map) as f:
                label_map = json.load(f)
        self.label_map = label_map
        self._features = _TsvTable(path)
        self._predictions = _TsvTable(predictions) if predictions else None

    def build_index(self) -> None:
        """Index row offsets by id now (e.g. in the main process, before DataLoader workers fork)."""
        self._features.index()
        if self._predictions is not None:
            self._predictions.index()

    def _offset(self, image_id: Any) -> tuple[str, int] | None:
        index = self._features.index()
        for key in candidate_keys(image_id):
            if key in index:
                return key, index[key]
        return None

    def __contains__(self, image_id: Any) -> bool:
        return self._offset(image_id) is not None

    def keys(self) -> Iterator[str]:
        return iter(self._features.ids())

    def __len__(self) -> int:
        return len(self._features.index())

    def close(self) -> None:
        self._features.close()
        if self._predictions is not None:
            self._predictions.close()

    def get(self, image_id: Any) -> dict:
        found = self._offset(image_id)
        if found is None:
            raise missing_key(image_id, self.path)
        key, offset = found
        where = f"{self.path}[{key}]"
        feats = decode_features_row(read_row(self._features.handle(), offset, where), where)
        record: dict[str, Any] = {}
        if self._predictions is not None:
            p_offset = self._predictions.index().get(key)
            if p_offset is not None:
                p_where = f"{self.predictions_path}[{key}]"
                cols = read_row(self._predictions.handle(), p_offset, p_where)
                try:
                    payload = json.loads(cols[1])
                except (IndexError, ValueError) as e:
                    raise FeatureReadError(p_where, f"malformed predictions row ({type(e).__name__}: {e})") from e
                record = predictions_fields(payload, feats.shape[0], self.label_map, p_where)
        rects = record.pop("rects", None)
        if self.split_box_dims:
            width, height = record.get("image_width"), record.get("image_height")
            if feats.shape[0] == 0:
                feats = np.zeros((0, self.feature_dim or 2048), dtype=np.float32)
                record["bbox"] = np.zeros((0, 4), dtype=np.float32)
                normalized = not (width and height)
            else:
                norm_dims = feats[:, -6:-2]
                feats, record["bbox"], normalized = split_oscar_features(feats, width, height, where)
                if not normalized and rects is not None:
                    scale = np.array([width, height, width, height], dtype=np.float32)
                    if np.allclose(rects / scale, norm_dims, atol=1e-3):
                        record["bbox"] = rects  # exact pixels, same boxes
            if normalized:
                record["bbox_normalized"] = True
                record["image_width"] = record["image_height"] = 1
        elif rects is not None:
            record["bbox"] = rects
        record["features"] = feats
        return check_record(record, where, self.feature_dim)
