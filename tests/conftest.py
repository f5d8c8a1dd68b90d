"""Shared test set-up: tiny thread count, quiet logs, and the optional real data folder."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# `precision: auto` means bf16 on CPUs with native bf16 and fp32 elsewhere: tests compare numbers,
# so they run in fp32 on every CPU kind (tests/test_precision.py checks `auto` itself)
os.environ.setdefault("SAMORA_PRECISION", "fp32")
# `infer --engine auto` caches exported models: under the test run, never in the user's home
os.environ["SAMORA_CACHE"] = tempfile.mkdtemp(prefix="samora-test-cache-")
# ... and would pick OpenVINO for folders of 3 volumes: tests run PyTorch eager unless they ask for an
# engine (tests/test_export.py checks `auto` itself, with this variable removed)
os.environ.setdefault("SAMORA_ENGINE", "eager")

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


@pytest.fixture(autouse=True)
def _no_log_handlers_on_closed_streams():
    """A workflow run configures logging (logging.conf) onto the stderr that pytest captured for
    that test; later tests must not log into that closed stream."""
    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield
