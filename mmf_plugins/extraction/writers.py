"""Feature writers: put extractor records into an MMF ``.npy`` folder, an LMDB or a VinVL TSV.

Each writer is registered (``registry.get_feature_writer_class("npy"|"lmdb"|"tsv")``), built as
``Writer(output_folder, **options)`` and used as ``write(image_id, record)``, ``exists(image_id)``
(for resuming), ``flush()``, ``close()`` (idempotent) or as a context manager. Records follow
``mmf_plugins/datasets/databases/feature_record.py``; the matching readers are in the same folder.

What "atomic" means per format (a killed job resumes and loses nothing ``exists`` reports):

* ``npy`` (MMF ``tools/scripts/features`` layout): ``<id>_info.npy`` then ``<id>.npy``, each written
  to a temp file and ``os.replace``d; ``exists`` looks for ``<id>.npy``, so it never sees half a record.
* ``lmdb``: records are committed in transactions of ``commit_every`` (a kill loses at most the
  uncommitted ones, which ``exists`` then reports missing); the map grows by doubling on
  ``MapFullError``. Values are safetensors bytes (features_lmdb.py), never pickles.
* ``tsv`` (VinVL): appends ``features.tsv`` (``id, N, base64(float32 [N, 2054])``, the 2048-d feature
  ‖ 6 normalized box dims) and ``predictions.tsv`` (``id, {"objects": [{class, rect, conf, class_id,
  ...}], "image_h", "image_w"}``) with their ``.lineidx``. Opening an existing folder cuts a trailing
  partial row, keeps only rows present in both files, and rebuilds the ``.lineidx`` files from the data.
  TSV is append-only: writing an id twice is an error. ``cls_prob`` is not stored in this form.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Any

import lmdb
import numpy as np

from mmf_plugins.common.registry import registry
from mmf_plugins.datasets.databases.feature_record import (
    RECORD_KEYS,
    check_record,
    writer_error,
)
from mmf_plugins.datasets.databases.features_lmdb import close_reader_env, encode_record
from mmf_plugins.datasets.databases.features_npy import INFO_SUFFIX, npy_key
from mmf_plugins.datasets.databases.features_tsv import (
    FEATURES_FILE,
    complete_size,
    encode_features_row,
    encode_prediction_row,
    first_columns,
    lineidx_path,
    row_offsets,
    write_lineidx,
)

logger = logging.getLogger(__name__)


class FeatureWriter(abc.ABC):
    """Common checks and context-manager plumbing of the writers."""

    format: str = ""

    def __init__(self, output_folder: str | os.PathLike):
        self.output_folder = os.fspath(output_folder)
        self.closed = False
        self.num_written = 0
        self._warned_keys: set[str] = set()

    def _check(self, image_id: Any, record: dict) -> tuple[str, dict]:
        if self.closed:
            raise ValueError(f"{type(self).__name__} for {self.output_folder} is closed")
        key = str(image_id)
        if not key or any(c in key for c in "\t\r\n"):
            raise ValueError(f"invalid image id {image_id!r}: it must be non-empty, without tabs or newlines")
        unknown = set(record) - RECORD_KEYS - self._warned_keys
        if unknown:
            self._warned_keys |= unknown
            logger.warning("%s: record fields %s are not part of the feature record; not stored", self.output_folder, sorted(unknown))
        return key, check_record(record, key, error=writer_error)

    @abc.abstractmethod
    def write(self, image_id: Any, record: dict) -> None:
        """Store ``record`` for ``image_id``."""

    @abc.abstractmethod
    def exists(self, image_id: Any) -> bool:
        """Whether ``image_id`` is already stored (for resuming)."""

    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def _close(self) -> None: ...

    def close(self) -> None:
        if not self.closed:
            self._close()
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "closed", True) is False:
            try:
                self.close()  # a writer dropped without close(): keep what it buffered
            except Exception as e:  # noqa: BLE001  (at interpreter shutdown anything can fail)
                logger.debug("closing %s at garbage collection failed: %s", self.output_folder, e)


def _replace_atomically(path: str, write_fn) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@registry.register_feature_writer("npy")
class NpyFeatureWriter(FeatureWriter):
    """MMF layout: ``<out>/<id>.npy`` (float32 [N, D]) and ``<out>/<id>_info.npy`` (np.save of the other fields)."""

    format = "npy"

    def __init__(self, output_folder: str | os.PathLike):
        super().__init__(output_folder)
        os.makedirs(self.output_folder, exist_ok=True)

    def _path(self, image_id: Any) -> str:
        try:
            return os.path.join(self.output_folder, npy_key(image_id) + ".npy")
        except KeyError as e:
            raise ValueError(e.args[0]) from None

    def write(self, image_id: Any, record: dict) -> None:
        key, record = self._check(image_id, record)
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = {k: v for k, v in record.items() if k != "features"}
        # info first, features last: exists() (= features file present) never sees a partial record
        _replace_atomically(path[: -len(".npy")] + INFO_SUFFIX, lambda f: np.save(f, info, allow_pickle=True))
        _replace_atomically(path, lambda f: np.save(f, np.ascontiguousarray(record["features"]), allow_pickle=False))
        self.num_written += 1

    def exists(self, image_id: Any) -> bool:
        return os.path.isfile(self._path(image_id))

    def _close(self) -> None:
        pass


@registry.register_feature_writer("lmdb")
class LmdbFeatureWriter(FeatureWriter):
    """One LMDB environment (a folder with ``data.mdb``); key = image id, value = safetensors record.

    Options: ``map_size`` initial map size in bytes (doubled whenever full), ``commit_every`` records
    per transaction, ``sync`` fsync on commit.
    """

    format = "lmdb"

    def __init__(self, output_folder: str | os.PathLike, map_size: int = 1 << 28, commit_every: int = 64, sync: bool = True):
        super().__init__(output_folder)
        if int(commit_every) < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.commit_every = int(commit_every)
        os.makedirs(self.output_folder, exist_ok=True)
        close_reader_env(self.output_folder)  # py-lmdb allows one open per path and process
        self.env = lmdb.open(self.output_folder, map_size=int(map_size), subdir=True, sync=sync, meminit=False, max_dbs=0)
        self._pending: dict[bytes, bytes] = {}

    def write(self, image_id: Any, record: dict) -> None:
        key, record = self._check(image_id, record)
        self._pending[key.encode("utf-8")] = encode_record(record)
        self.num_written += 1
        if len(self._pending) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending.items():
                        txn.put(key, value)
            except lmdb.MapFullError:
                new_size = self.env.info()["map_size"] * 2
                logger.info("%s: LMDB map full; growing it to %d MiB", self.output_folder, new_size >> 20)
                self.env.set_mapsize(new_size)
                continue
            self._pending.clear()

    def exists(self, image_id: Any) -> bool:
        key = str(image_id).encode("utf-8")
        if key in self._pending:
            return True
        with self.env.begin() as txn:
            return txn.get(key) is not None

    def _close(self) -> None:
        self.flush()
        self.env.sync(True)
        self.env.close()


@registry.register_feature_writer("tsv")
class TsvFeatureWriter(FeatureWriter):
    """VinVL TSV: ``features.tsv`` + ``predictions.tsv`` (+ ``.lineidx``) in ``output_folder``."""

    format = "tsv"

    def __init__(self, output_folder: str | os.PathLike, features_file: str = FEATURES_FILE, predictions_file: str = "predictions.tsv"):
        super().__init__(output_folder)
        os.makedirs(self.output_folder, exist_ok=True)
        self.features_path = os.path.join(self.output_folder, features_file)
        self.predictions_path = os.path.join(self.output_folder, predictions_file)
        self._ids = self._recover()
        self._files = {p: open(p, "ab") for p in (self.features_path, self.predictions_path)}  # noqa: SIM115
        self._idx_files = {p: open(lineidx_path(p), "a") for p in self._files}  # noqa: SIM115

    def _recover(self) -> set[str]:
        """Make the two TSVs whole and aligned after a kill; return the ids they hold."""
        for p in (self.features_path, self.predictions_path):
            if not os.path.exists(p):
                open(p, "wb").close()
        offsets = {}
        for p in (self.features_path, self.predictions_path):
            end = complete_size(p)
            if end != os.path.getsize(p):
                logger.warning("%s: cutting a partial last row (%d bytes) left by a killed writer", p, os.path.getsize(p) - end)
                os.truncate(p, end)
            offsets[p] = row_offsets(p, end)
        n = min(len(o) for o in offsets.values())
        for p, offs in offsets.items():
            if len(offs) > n:  # a row written to one file only: drop it, the record is redone
                logger.warning("%s: dropping %d row(s) without a partner row", p, len(offs) - n)
                os.truncate(p, int(offs[n]))
            write_lineidx(p, offs[:n])
        ids = first_columns(self.predictions_path, offsets[self.predictions_path][:n])
        if len(set(ids)) != len(ids):
            logger.warning("%s holds repeated image ids; readers return the last row of each", self.predictions_path)
        return set(ids)

    def _append(self, path: str, row: bytes) -> None:
        f = self._files[path]
        offset = f.tell()
        f.write(row)
        f.flush()  # one complete row reaches the OS before its index entry
        idx = self._idx_files[path]
        idx.write(f"{offset}\n")
        idx.flush()

    def write(self, image_id: Any, record: dict) -> None:
        key, record = self._check(image_id, record)
        if key in self._ids:
            raise ValueError(f"image id '{key}' is already in {self.features_path}; TSV files are append-only")
        if record.get("bbox") is None or not record.get("image_width") or not record.get("image_height"):
            raise ValueError(
                f"invalid feature record for image {key}: the TSV form needs 'bbox', 'image_width' and "
                "'image_height' to compute the 6 box dims"
            )
        features_row = encode_features_row(key, record)
        predictions_row = encode_prediction_row(key, record)
        # features first, predictions last: exists() reads predictions, so a record is whole once it is there
        self._append(self.features_path, features_row)
        self._append(self.predictions_path, predictions_row)
        self._ids.add(key)
        self.num_written += 1

    def exists(self, image_id: Any) -> bool:
        return str(image_id) in self._ids

    def flush(self) -> None:
        for f in (*self._files.values(), *self._idx_files.values()):
            f.flush()
            os.fsync(f.fileno())

    def _close(self) -> None:
        self.flush()
        for f in (*self._files.values(), *self._idx_files.values()):
            f.close()


def open_feature_writer(format: str, output_folder: str | os.PathLike, **options) -> FeatureWriter:
    """``registry.get_feature_writer_class(format)(output_folder, **options)``."""
    return registry.get_feature_writer_class(format)(output_folder, **options)
