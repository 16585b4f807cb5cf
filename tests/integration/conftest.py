"""Integration tests use the shared real-peer fixtures of ``tests/conftest.py``.

Every integration module runs twice: with the node's index on SQLite (the default config) and on
PostgreSQL (``index_backend``).  For the PostgreSQL pass every node a test starts -- ``serve``
and the CLI, as subprocesses -- gets ``SCP_NODE__STORE__DATABASE_URL`` (the config's environment
override) naming a fresh database on the run's throw-away cluster: one per module (set before any
module-scoped fixture starts a node) and one per test.  The tests look into the index with
``sqlite3.connect(<folder>/index.db)``; in the PostgreSQL pass their module's ``sqlite3`` is
swapped for :class:`IndexOnPostgres`, which opens that test's database instead.

``-m "not postgresql"`` runs the SQLite pass only.  A network test that runs on both receive
paths (``receive_path``) runs the fast path on SQLite and pynetdicom's own path on PostgreSQL: the
receive path and the index are independent (the receive path hands the index the same rows
either way), so each path and each database still run every such test, at the cost of two runs
instead of four (tests/dimse, tests/faults and tests/web run both paths on SQLite too).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest

ENV_URL = "SCP_NODE__STORE__DATABASE_URL"
INDEX_FILE = "index.db"


@pytest.fixture(scope="module", autouse=True,
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def index_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The index of every node the module starts: SQLite (the config's own URL) or PostgreSQL."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.database_url()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_URL, url)
        yield "postgresql"
    server.drop_database(url)


@pytest.fixture(autouse=True)
def index_database(index_backend: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """On PostgreSQL: a fresh database for this test's nodes (its URL), and the module's
    ``sqlite3`` looking at it; on SQLite: nothing to do (None)."""
    if index_backend != "postgresql":
        yield None
        return
    server = request.getfixturevalue("postgres_server")
    url = server.database_url()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_URL, url)
        if getattr(request.module, "sqlite3", None) is sqlite3:
            mp.setattr(request.module, "sqlite3", IndexOnPostgres(url))
        yield url
    server.drop_database(url)


#: The receive path each index runs a network test on (see the module docstring).
PATH_FOR_INDEX = {"sqlite": "fast", "postgresql": "library"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each receive path on one index (see the module docstring); and no PostgreSQL pass for a
    module that sets ``OWN_INDEX = True``: it gives its nodes their index itself (the scale-out
    test's shared PostgreSQL database), so the override would only run it again."""
    def drop(item: pytest.Item) -> bool:
        backend, path = _param(item, "index_backend"), _param(item, "receive_path")
        if backend == "postgresql" and getattr(item.module, "OWN_INDEX", False):
            return True
        return path is not None and backend is not None and PATH_FOR_INDEX[backend] != path

    dropped = [item for item in items if drop(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in set(dropped)]


def _param(item: pytest.Item, name: str) -> Any:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get(name)


class IndexOnPostgres:
    """Stands in for the ``sqlite3`` module of a test module: ``connect(<folder>/index.db)``
    opens the PostgreSQL database the test's nodes use; any other file is SQLite's."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    def connect(self, database: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(database)).name != INDEX_FILE:
            return sqlite3.connect(database, *args, **kwargs)
        return _Connection(self.conninfo)

    def __getattr__(self, name: str) -> Any:
        return getattr(sqlite3, name)


class _Connection:
    """The part of ``sqlite3.Connection`` the tests use (``execute`` with ``?`` parameters,
    ``iterdump``, ``with``)."""

    def __init__(self, conninfo: str) -> None:
        import psycopg

        self._conn = psycopg.connect(conninfo, autocommit=True)

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        if params:
            sql = sql.replace("%", "%%").replace("?", "%s")
            return self._conn.execute(sql, tuple(params))  # type: ignore[arg-type]
        return self._conn.execute(sql)  # type: ignore[arg-type]

    def iterdump(self) -> Iterator[str]:
        """Every row of every table, one ``INSERT INTO "<table>" VALUES(...)`` line each (the
        lines ``sqlite3``'s dump gives for rows: what a test searches for values)."""
        tables = [r[0] for r in self._conn.execute(
            "select tablename from pg_tables where schemaname = current_schema() order by tablename")]
        for table in tables:
            for row in self._conn.execute(f'select * from "{table}"'):  # (names from the catalogue)
                yield f'INSERT INTO "{table}" VALUES({",".join(repr(v) for v in row)});'

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
