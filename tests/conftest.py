"""Shared fixtures for the unit tests: a real SQLite index, a real audit trail, real DICOM files.

Nothing here is autouse, so the integration tests (which run the node as a subprocess) are not
affected.  Fixture names are prefixed (``index_db``, ``audit_trail``...) so that a folder's own
conftest can define short names without clashing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from scp_node.audit import AuditTrail, load_or_create_secret
from scp_node.store.db import Database
from scp_node.store.ingest import Ingestor, Origin
from tests.store.realdata import ORIGIN, read_bytes

@pytest.fixture
def index_db(tmp_path: Path) -> Iterator[Database]:
    """A fresh SQLite index (WAL, BEGIN IMMEDIATE: the production configuration)."""
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    yield db
    db.dispose()


@pytest.fixture
def audit_secret(tmp_path: Path) -> bytes:
    return load_or_create_secret(tmp_path / "audit.key")


@pytest.fixture
def audit_trail(index_db: Database, audit_secret: bytes) -> AuditTrail:
    return AuditTrail(index_db, audit_secret)


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def ingestor(index_db: Database, storage_dir: Path, audit_trail: AuditTrail) -> Ingestor:
    return Ingestor(index_db, storage_dir, audit_trail, "keep_first")


@pytest.fixture
def ingest_files(ingestor: Ingestor) -> Callable[..., list[Any]]:
    """Ingest real files by path; returns the outcomes."""

    def _ingest(*paths: Path, origin: Origin = ORIGIN) -> list[Any]:
        return [ingestor.ingest(read_bytes(p), origin) for p in paths]

    return _ingest


if TYPE_CHECKING:
    from tests.support.orthanc import Orthanc


# -- real peers: the test model, a free node port, Orthanc (integration and fault suites) --------


#: The node's receive path for a test: ``[node] fast_path`` through the environment override the
#: node subprocess inherits (tests/support/node.py passes os.environ on).
FAST_PATH_ENV = "SCP_NODE__NODE__FAST_PATH"


@pytest.fixture(scope="module", params=["fast", "library"])
def receive_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once on the fast path and once on pynetdicom's own path ([node] fast_path =
    false), so the fast path is always checked against the library's behaviour.  Network test
    modules use it with ``pytest.mark.usefixtures("receive_path")``; it is set before their node
    starts.  Module-scoped, so that a module-scoped node fixture that requests it is started once
    per path (a node started on one path and reused for the other would test only the first)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAST_PATH_ENV, "true" if request.param == "fast" else "false")
        yield str(request.param)


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random MedGemma-architecture model, made once through the real CLI command."""
    from tests.support.node import cli

    folder = tmp_path_factory.mktemp("model") / "test-model"
    result = cli("make-test-model", str(folder))
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One throw-away PostgreSQL cluster for the whole run (tests/support/postgres.py), started on
    first use; each test gets its own database from :func:`postgres_url`."""
    from tests.support.postgres import start_postgres

    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (SQLAlchemy URL, psycopg 3), dropped after."""
    url = postgres_server.database_url()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def node_port() -> int:
    from tests.support.net import free_port

    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator["Orthanc"]:
    """Orthanc knowing the node as modality ``scpnode``."""
    from tests.support.orthanc import start_orthanc

    pacs = start_orthanc(tmp_path / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)})
    yield pacs
    pacs.stop()
