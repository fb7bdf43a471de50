"""Shared test settings: small thread count, deterministic seeds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _package_logger_restored():
    logger = logging.getLogger("dit_mem")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = state[0]
    logger.propagate, logger.level = state[1], state[2]


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """`dit-mem` commands configure the package logger (handlers, no propagation); undo that
    after each test so that later tests' ``caplog`` still sees the records."""
    yield from _package_logger_restored()


@pytest.fixture(scope="module", autouse=True)
def _restore_package_logger_after_module():
    """The same around a module: module-scoped fixtures may run commands too."""
    yield from _package_logger_restored()


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread. Two OpenMP threads on a busy 2-core machine spend most of
    each tiny op waiting at barriers (a run measured 100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
