"""Shared fixtures: the test plugin folder (a model and a dataset registered as a user would)."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "tests" / "fixtures" / "user_dir"

os.environ.setdefault("MMF_CACHE_DIR", str(ROOT / ".pytest_mmf_cache"))
# Tiny test models spend more time in thread hand-offs than in math: one intra-op thread keeps the
# suite fast and its timing stable on 2 shared cores.
torch.set_num_threads(1)


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
