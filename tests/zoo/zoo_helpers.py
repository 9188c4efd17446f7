"""Helpers shared by the zoo tests: write a zoo yaml and point MMF_MODEL_ZOO / MMF_DATASET_ZOO at it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_zoo(path: Path, monkeypatch, models: dict | None = None, datasets: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for kind, table, env in (("models", models, "MMF_MODEL_ZOO"), ("datasets", datasets, "MMF_DATASET_ZOO")):
        file = path / f"{kind}.yaml"
        file.write_text(yaml.safe_dump(table or {}, sort_keys=False))
        monkeypatch.setenv(env, str(file))


def resource(url: str, file_name: str, hashcode: str = "", compressed: bool = False, **extra) -> dict:
    return {"url": url, "file_name": file_name, "hashcode": hashcode, "compressed": compressed, **extra}
