"""Fixtures for tests that run real peers: the test model, Orthanc, the node as a subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.net import free_port
from tests.support.node import cli
from tests.support.orthanc import Orthanc, start_orthanc


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
    """Orthanc knowing the node as modality ``scpnode``."""
    pacs = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)})
    yield pacs
    pacs.stop()
