"""Shared work directory of the reliability scenarios: the straight runs and checkpointed runs
they compare with are made once per pytest worker."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory the scenarios of one test module share (straight runs are cached in it)."""
    return tmp_path_factory.mktemp("reliability")
