"""One entry point over the feature stores: ``open_feature_database`` and ``ConcatFeatureDatabase``.

MMF picks a feature reader from the path (``.lmdb`` suffix, else the ndim of the first ``.npy``;
``mmf/datasets/databases/readers/feature_readers.py``) and joins comma-separated feature folders into
``image_feature_0/1/...``. Here the format is detected from what is on disk:

* a folder holding ``data.mdb``, a path ending in ``.lmdb``, or a ``data.mdb`` file -> LMDB
  (features_lmdb.py);
* a ``.tsv`` file, or a folder holding ``features.tsv`` -> VinVL TSV (features_tsv.py);
* any other folder -> MMF ``.npy`` + ``_info.npy`` (features_npy.py).

Several stores of the same images (e.g. COCO train2014 and val2014) are one database with
``ConcatFeatureDatabase``: the first store holding an id answers. The record and padding contract is
in feature_record.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mmf_plugins.datasets.databases.feature_record import (  # noqa: F401  (re-exported API)
    FeatureDatabase,
    FeatureReadError,
    check_record,
    missing_key,
    oscar_box_dims,
    pad_features,
    split_oscar_features,
)
from mmf_plugins.datasets.databases.features_lmdb import LmdbFeatureDatabase
from mmf_plugins.datasets.databases.features_npy import NpyFeatureDatabase
from mmf_plugins.datasets.databases.features_tsv import (
    FEATURES_FILE,
    TsvFeatureDatabase,
)

FORMATS = {"npy": NpyFeatureDatabase, "lmdb": LmdbFeatureDatabase, "tsv": TsvFeatureDatabase}


def detect_format(path: str) -> str:
    """``"npy"``, ``"lmdb"`` or ``"tsv"`` for an existing path; ``FileNotFoundError`` / ``ValueError`` otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"feature store not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "data.mdb")):
            return "lmdb"
        if os.path.isfile(os.path.join(path, FEATURES_FILE)):
            return "tsv"
        return "npy"
    name = os.path.basename(path)
    if name.endswith(".lmdb") or name == "data.mdb":
        return "lmdb"
    if name.endswith(".tsv"):
        return "tsv"
    raise ValueError(
        f"cannot tell the feature format of file {path}: expected a .tsv file, an LMDB (.lmdb / data.mdb) "
        "or a folder of .npy files; pass format='npy'|'lmdb'|'tsv'"
    )


def open_feature_database(path_or_spec: Any, format: str = "auto", **params) -> FeatureDatabase:
    """Open a feature store.

    ``path_or_spec`` is a path, a list of paths/specs (-> ``ConcatFeatureDatabase``), or a mapping
    ``{"path": ..., "format": ..., <reader params>}``. ``params`` go to the reader (``feature_dim``,
    ``split_box_dims``, ``predictions``, ``label_map``, ``mmap``).
    """
    if isinstance(path_or_spec, Mapping):
        spec = dict(path_or_spec)
        if "path" not in spec:
            raise KeyError(f"feature store spec needs a 'path'; got keys {', '.join(spec)}")
        path = spec.pop("path")
        format = spec.pop("format", format)
        return open_feature_database(path, format, **{**params, **spec})
    if isinstance(path_or_spec, (list, tuple)):
        return ConcatFeatureDatabase([open_feature_database(p, format, **params) for p in path_or_spec])
    path = os.fspath(path_or_spec)
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise ValueError(f"unknown feature format '{format}'; expected auto, {', '.join(FORMATS)}")
    if format == "lmdb" and os.path.basename(path) == "data.mdb":
        path = os.path.dirname(path) or "."
    return FORMATS[format](path, **params)


class ConcatFeatureDatabase(FeatureDatabase):
    """Several stores as one; ``get`` asks them in order and the first holding the id answers."""

    def __init__(self, databases: Iterable[FeatureDatabase]):
        self.databases = list(databases)
        if not self.databases:
            raise ValueError("ConcatFeatureDatabase needs at least one feature store")
        self.path = " + ".join(db.path for db in self.databases)

    def get(self, image_id: Any) -> dict:
        for db in self.databases:
            try:
                return db.get(image_id)
            except KeyError:  # not in this store (readers raise KeyError only for a missing id)
                continue
        raise missing_key(image_id, self.path)

    def __contains__(self, image_id: Any) -> bool:
        return any(image_id in db for db in self.databases)

    def keys(self) -> Iterator[str]:
        seen: set[str] = set()
        for db in self.databases:
            for key in db:
                if key not in seen:
                    seen.add(key)
                    yield key

    def close(self) -> None:
        for db in self.databases:
            db.close()
