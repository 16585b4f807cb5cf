"""Fixtures for the fault suite: the test model, Orthanc, and the counts every test reports.

Each test adds what it checked to :func:`counts` (instances sent with success vs. indexed,
exports expected vs. delivered, malformed inputs tried vs. answered cleanly).  At the end of the
session they are printed and merged into ``test-artifacts/fault-counts.json`` for the README.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.net import free_port
from tests.support.node import cli
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.paths import REPO

ARTIFACT = REPO / "test-artifacts" / "fault-counts.json"
_COUNTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random MedGemma-architecture model, made once through the real CLI command."""
    folder = tmp_path_factory.mktemp("model") / "test-model"
    result = cli("make-test-model", str(folder))
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)})
    yield pacs
    pacs.stop()


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
