"""Shared fixtures: one gloo process pool for the whole session."""
from __future__ import annotations

import pytest

from distributed_pool import GlooPool


@pytest.fixture(scope="session")
def pool():
    p = GlooPool()
    yield p
    p.close()
