"""Shared test set-up: tiny thread count, quiet logs, and the optional real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# `precision: auto` means bf16 on CPUs with native bf16 and fp32 elsewhere: tests compare numbers,
# so they run in fp32 on every CPU kind (tests/test_precision.py checks `auto` itself)
os.environ.setdefault("SAMORA_PRECISION", "fp32")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("real data folder ../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
