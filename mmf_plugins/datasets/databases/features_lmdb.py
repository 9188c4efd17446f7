"""Feature store in one LMDB environment: key = image id (utf-8), value = one serialized record.

Value format (``encode_record`` / ``decode_record``): a safetensors blob. Its tensors are the record's
arrays (``features``, ``bbox``, ``objects``, ``scores``, ``cls_prob``, ``attributes``,
``attr_scores``); its ``__metadata__`` holds ``format`` = ``"mmf_plugins.feature_record/1"`` and
``record`` = a JSON object with the scalars and strings (``num_boxes``, ``image_width``,
``image_height``, ``object_names``, ``attribute_names``, ``bbox_normalized``). Nothing in it is
executable, unlike MMF's pickled values.

MMF's own LMDBs (``tools/scripts/features/lmdb_conversion.py``: pickled dicts ``{feature_path,
features, image_height, image_width, num_boxes, objects, cls_prob, bbox}`` plus a ``b"keys"`` entry)
are read too, through the restricted unpickler of safe_pickle.py, and looked up the MMF way (the id as
given, then ``str(int(stem.split("_")[-1]))``).

The environment is opened read-only with ``lock=False, readahead=False`` on first access, and again
after a fork (the pid is kept), so each DataLoader worker gets its own handle. Handles live in a
per-process table keyed by path (py-lmdb refuses a second open of one environment in a process, and
train/val datasets often share a store); ``close()`` closes it for every database on that path, and
the next access reopens it. A database object holds no handle, so it pickles to spawned workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import lmdb
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from mmf_plugins.datasets.databases import safe_pickle
from mmf_plugins.datasets.databases.feature_record import (
    ARRAY_FIELDS,
    INT_FIELDS,
    NAME_FIELDS,
    FeatureDatabase,
    FeatureReadError,
    candidate_keys,
    check_record,
    missing_key,
)
from mmf_plugins.datasets.databases.features_npy import record_from_info

RECORD_FORMAT = "mmf_plugins.feature_record/1"
MMF_KEYS_ENTRY = b"keys"  # MMF's pickled list of keys; not a record


def encode_record(record: dict) -> bytes:
    """Serialize a checked record (see ``feature_record.check_record``) to safetensors bytes."""
    arrays = {k: np.ascontiguousarray(record[k]) for k in ARRAY_FIELDS if record.get(k) is not None}
    scalars = {k: record[k] for k in (*INT_FIELDS, *NAME_FIELDS, "bbox_normalized") if record.get(k) is not None}
    return safetensors.numpy.save(arrays, metadata={"format": RECORD_FORMAT, "record": json.dumps(scalars)})


def decode_record(data: bytes, where: str) -> dict:
    """Inverse of ``encode_record``; also accepts MMF's pickled values. Raises ``FeatureReadError``."""
    # ours: safetensors = 8-byte header length, then a json header opening with '{"' (the length's low
    # byte may itself be 0x80, so the pickle test below must not come first)
    if data[:1] == b"\x80" and data[8:10] != b'{"':  # pickle protocol >= 2: an MMF-written LMDB
        try:
            info = safe_pickle.loads(data)
        except Exception as e:
            raise FeatureReadError(where, f"unreadable MMF pickled value ({type(e).__name__}: {e})") from e
        if not isinstance(info, dict) or "features" not in info:
            raise FeatureReadError(where, "MMF LMDB value is not a dict with 'features'")
        return info
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
        if meta.get("format") != RECORD_FORMAT:
            raise ValueError(f"metadata format {meta.get('format')!r} is not {RECORD_FORMAT!r}")
        record = json.loads(meta["record"])
        record.update(safetensors.numpy.load(data))
    except (SafetensorError, ValueError, TypeError, AttributeError) as e:
        raise FeatureReadError(where, f"corrupt record ({type(e).__name__}: {e})") from e
    return record


# path -> (pid, read-only environment). py-lmdb refuses to open one environment twice in a process,
# and train/val datasets often share one store, so handles are per process, not per database object.
# A pid that is not ours means we are a forked child: the inherited handle must not be used (LMDB docs).
_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_env(path: str, subdir: bool) -> lmdb.Environment:
    key = os.path.realpath(path)
    entry = _ENVS.get(key)
    if entry is None or entry[0] != os.getpid():
        if entry is not None:
            # inherited from the parent: release our copy (read-only, lock-free: no shared lock table
            # is touched) so py-lmdb lets this process open the path again
            entry[1].close()
        env = lmdb.open(path, subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024)
        _ENVS[key] = entry = (os.getpid(), env)
    return entry[1]


def close_reader_env(path: str) -> None:
    """Close this process's read-only handle on ``path`` (if any); the next read reopens it."""
    entry = _ENVS.pop(os.path.realpath(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


class LmdbFeatureDatabase(FeatureDatabase):
    """Read records from an LMDB environment (a folder holding ``data.mdb``, or a single file).

    Args:
        path: the environment (``features.lmdb/`` or ``features.lmdb`` file).
        feature_dim: expected D; other sizes raise ``FeatureReadError``.
        split_box_dims: features carry 6 trailing OSCAR box dims (e.g. MMF's VinVL LMDBs): split them off.
    """

    def __init__(self, path: str | os.PathLike, feature_dim: int | None = None, split_box_dims: bool = False):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"LMDB feature store not found: {self.path}")
        self.subdir = os.path.isdir(self.path)
        if self.subdir and not os.path.isfile(os.path.join(self.path, "data.mdb")):
            raise FileNotFoundError(f"{self.path} is a folder without data.mdb; not an LMDB environment")
        self.feature_dim = feature_dim
        self.split_box_dims = bool(split_box_dims)

    # --------------------------------------------------------------- handle
    def env(self) -> lmdb.Environment:
        return _open_env(self.path, self.subdir)

    def close(self) -> None:
        close_reader_env(self.path)

    # --------------------------------------------------------------- access
    def _raw(self, image_id: Any) -> tuple[str, bytes] | None:
        with self.env().begin() as txn:
            for key in candidate_keys(image_id):
                value = txn.get(key.encode("utf-8"))
                if value is not None:
                    return key, value
        return None

    def get(self, image_id: Any) -> dict:
        found = self._raw(image_id)
        if found is None:
            raise missing_key(image_id, self.path)
        key, value = found
        where = f"{self.path}[{key}]"
        raw = decode_record(value, where)
        feats = np.asarray(raw.get("features"))
        if feats.ndim != 2:
            raise FeatureReadError(where, f"features have shape {tuple(feats.shape)}; expected [N, D]")
        # one mapping for our records and MMF's dicts (its key names, 6-d boxes, box-dim splitting)
        return check_record(record_from_info(feats, raw, self.split_box_dims, where), where, self.feature_dim)

    def __contains__(self, image_id: Any) -> bool:
        return self._raw(image_id) is not None

    def keys(self) -> Iterator[str]:
        with self.env().begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if key != MMF_KEYS_ENTRY:
                    yield key.decode("utf-8")

    def __len__(self) -> int:
        env = self.env()
        with env.begin() as txn:
            extra = 1 if txn.get(MMF_KEYS_ENTRY) is not None else 0
        return env.stat()["entries"] - extra
