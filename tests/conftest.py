"""Shared pytest fixtures. Plain helpers live in ``tests/helpers.py`` (import them
directly: ``from helpers import write_dataset``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import write_dataset


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator (seed 1234) for one test."""
    return np.random.default_rng(1234)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., dict]:
    """Factory writing a dataset under ``tmp_path``: ``make_dataset(name="data.h5", **kw)``
    takes the keyword arguments of :func:`helpers.write_dataset` and returns its dict."""

    def _make(name: str = "data.h5", **kwargs) -> dict:
        return write_dataset(tmp_path / name, **kwargs)

    return _make


@pytest.fixture
def small_dataset(make_dataset) -> dict:
    """8 images of one 8x8 panel, skopi layout, with mask and orientations (seed 0)."""
    return make_dataset()
