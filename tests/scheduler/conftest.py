"""Scheduler fixtures: a real CT series in the real index (fakes live in ``fakes.py``)."""

from __future__ import annotations

from typing import Callable

import pytest

from scp_node.store.ingest import Ingestor
from tests.store.realdata import CT_SLICES, ORIGIN, read_bytes


@pytest.fixture
def ingest_ct(ingestor: Ingestor) -> Callable[..., None]:
    def _ingest(*indexes: int) -> None:
        for i in indexes:
            ingestor.ingest(read_bytes(CT_SLICES[i]), ORIGIN)
    return _ingest
