"""Fixtures for the fault suite: the counts every test reports (model and Orthanc: tests/conftest.py).

Each test adds what it checked to :func:`counts` (instances sent with success vs. indexed,
exports expected vs. delivered, malformed inputs tried vs. answered cleanly).  At the end of the
session they are printed and merged into ``test-artifacts/fault-counts.json`` for the README.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.paths import REPO

ARTIFACT = REPO / "test-artifacts" / "fault-counts.json"
_COUNTS: dict[str, dict[str, Any]] = {}


@pytest.fixture
def counts(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict the test fills with what it counted; kept under the test's name."""
    entry: dict[str, Any] = {}
    _COUNTS[request.node.name] = entry
    return entry


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _COUNTS:
        return
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged = json.loads(ARTIFACT.read_text())
    except (OSError, ValueError):
        merged = {}
    merged.update(_COUNTS)
    ARTIFACT.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    print("\nfault counts (also in test-artifacts/fault-counts.json):")
    for name, entry in sorted(_COUNTS.items()):
        print(f"  {name}: {json.dumps(entry, sort_keys=True)}")
