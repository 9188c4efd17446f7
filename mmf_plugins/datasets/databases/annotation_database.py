"""AnnotationDatabase: the list of annotation items of one split, read from ``.json``, ``.jsonl`` or ``.npy``.

Follows MMF ``mmf/datasets/databases/annotation_database.py``:

* ``.npy`` imdb: a pickled object array (or a dict ``{"metadata", "data"}``); when the array's first
  element is a header dict without ``image_id`` (e.g. ``{"dataset_name": "gqa"}``) it is skipped;
* ``.jsonl``: one JSON object per line;
* ``.json``: ``{"metadata": ..., "data": [...]}`` or, here also, a bare list or a dict holding the
  list under ``list_key`` (``"questions"``, ``"annotations"``, ...);
* item fix-ups on read: ``answers`` <- ``valid_answers``, else ``all_answers``; a trailing ``<copy>``
  answer is dropped.

Deliberate differences: ``.npy`` files are unpickled with a restricted unpickler (safe_pickle.py);
a malformed ``.jsonl`` line is logged with file and line number, counted in ``num_bad`` and skipped,
and only a fraction above ``max_bad_fraction`` is an error; the visdial special cases are not carried.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from mmf_plugins.datasets.databases.safe_pickle import load_npy

logger = logging.getLogger(__name__)

# Shown in messages; ".json" dicts may hold their list under any key via ``list_key``.
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".npy")


class AnnotationDatabase:
    """Annotation items of one split: ``len(db)``, ``db[i]`` (a fresh shallow copy of item ``i``).

    Args:
        path: annotation file (``.json``, ``.jsonl`` or ``.npy``).
        list_key: for a ``.json`` dict, the key holding the item list (e.g. ``"questions"``).
            Default: ``"data"`` if present, else the dict's only list-valued key.
        max_bad_fraction: largest tolerated fraction of malformed ``.jsonl`` lines (default 0.01).
    """

    def __init__(self, path: str | os.PathLike, list_key: str | None = None, max_bad_fraction: float = 0.01):
        self.path = os.fspath(path)
        self.list_key = list_key
        self.max_bad_fraction = float(max_bad_fraction)
        self.metadata: dict[str, Any] = {}
        self.num_bad = 0
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"annotation file not found: {self.path}. Check dataset_config.<name>.annotations and "
                "env.data_dir (paths are relative to the dataset's data_dir)."
            )
        ext = os.path.splitext(self.path)[1].lower()
        if ext == ".jsonl":
            self.data = self._load_jsonl()
        elif ext == ".json":
            self.data = self._load_json()
        elif ext == ".npy":
            self.data = self._load_npy()
        else:
            raise ValueError(
                f"unsupported annotation file {self.path}: extension '{ext}'; expected one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )

    # ------------------------------------------------------------------ loaders
    def _load_jsonl(self) -> list:
        items: list = []
        total = 0
        bad_lines: list[int] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                total += 1
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    reason = f"invalid JSON ({e.msg} at column {e.colno})"
                else:
                    if isinstance(item, dict):
                        items.append(item)
                        continue
                    reason = f"expected a JSON object, got {type(item).__name__}"
                bad_lines.append(lineno)
                logger.warning("%s:%d: skipped annotation line: %s", self.path, lineno, reason)
        self.num_bad = len(bad_lines)
        if total and self.num_bad / total > self.max_bad_fraction:
            shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
            raise ValueError(
                f"{self.path}: {self.num_bad} of {total} lines are malformed (lines {shown}), more than "
                f"max_bad_fraction={self.max_bad_fraction}. Fix the file or raise max_bad_fraction."
            )
        return items

    def _load_json(self) -> list:
        with open(self.path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
        if isinstance(obj, list):
            return obj
        if not isinstance(obj, dict):
            raise TypeError(f"{self.path}: expected a JSON list or object, got {type(obj).__name__}")
        list_keys = [k for k, v in obj.items() if isinstance(v, list)]
        key = self.list_key
        if key is None:
            if "data" in list_keys:
                key = "data"
            elif len(list_keys) == 1:
                key = list_keys[0]
            else:
                raise ValueError(
                    f"{self.path}: cannot tell which list holds the items (list-valued keys: "
                    f"{', '.join(list_keys) or 'none'}); pass list_key, e.g. list_key='questions'"
                )
        if key not in obj or not isinstance(obj[key], list):
            raise KeyError(
                f"{self.path}: no list under key '{key}'; list-valued keys: {', '.join(list_keys) or 'none'}"
            )
        self.metadata = obj.get("metadata", {}) if isinstance(obj.get("metadata"), dict) else {}
        return obj[key]

    def _load_npy(self) -> list:
        try:
            obj = load_npy(self.path)
        except Exception as e:  # a corrupt or hostile file: say which one
            raise ValueError(f"{self.path}: cannot read annotation .npy ({type(e).__name__}: {e})") from e
        if isinstance(obj, dict):
            if "data" not in obj:
                raise KeyError(f"{self.path}: .npy dict has no 'data' key; keys: {', '.join(map(str, obj))}")
            self.metadata = obj.get("metadata", {}) or {}
            data = obj["data"]
        else:
            data = obj
        data = list(data.tolist() if isinstance(data, np.ndarray) and data.dtype != object else data)
        # NOTE(parity): MMF skips element 0 when it is a header (a dict without image_id).
        if data and isinstance(data[0], dict) and "image_id" not in data[0]:
            self.metadata = {**self.metadata, **data[0]}
            data = data[1:]
        return data

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        item = self.data[idx]
        if not isinstance(item, dict):
            return item
        item = dict(item)
        if "answers" not in item:
            if "valid_answers" in item:
                item["answers"] = item["valid_answers"]
            elif "all_answers" in item:
                item["answers"] = item["all_answers"]
        answers = item.get("answers")
        if isinstance(answers, list) and answers and answers[-1] == "<copy>":
            item["answers"] = answers[:-1]
        return item

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"AnnotationDatabase({self.path!r}, items={len(self)}, bad_lines={self.num_bad})"
