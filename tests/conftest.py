"""Shared fixtures: the test plugin folder (a model and a dataset registered as a user would)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "tests" / "fixtures" / "user_dir"

os.environ.setdefault("MMF_CACHE_DIR", str(ROOT / ".pytest_mmf_cache"))


@pytest.fixture
def user_dir() -> Path:
    return USER_DIR


@pytest.fixture
def base_opts(user_dir, tmp_path):
    return [
        f"config={user_dir / 'configs' / 'experiment.yaml'}",
        "model=simple_model",
        "datasets=numbers",
        f"env.user_dir={user_dir}",
        f"env.save_dir={tmp_path / 'save'}",
    ]
