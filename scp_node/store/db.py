"""One database engine per process, shared by every handler thread and job.

pynetdicom's sample qrscp opens a new engine per C-STORE; we open one here and hand out
short sessions.  On SQLite every transaction starts with ``BEGIN IMMEDIATE`` so that concurrent
associations queue on the write lock (with a busy timeout) instead of failing on a lock upgrade,
and WAL lets readers (``scp-node status``) work while the node writes.  Before that, threads of
one process queue on a Python lock and processes (the node's receivers, the CLI) on an ``flock``
of ``<index>.lock``: SQLite's own busy handler polls with sleeps of 1 to 100 ms, and with several
associations storing at once those sleeps, not the work, set the pace.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from .driver import CoreTransaction, DriverTransaction, IndexTransaction
from .schema import create_if_empty

log = logging.getLogger(__name__)


class Database:
    """The index database: engine, session factory and, on an empty database, the schema.

    A database that has tables is never changed on open: its schema is Alembic's business
    (``scp-node db upgrade``, :mod:`.schema`), and ``serve`` checks that it is current.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        self._lock_path: Path | None = None
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._lock_path = Path(path + ".lock")
            kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: Every SQLite transaction is a write transaction (BEGIN IMMEDIATE): one at a time.
        self._thread_lock = threading.RLock()
        self._depth = 0  # sessions open in the thread holding _thread_lock
        self._lock_fd: int | None = None
        self._driver_statements: dict[Any, Any] = {}  # compiled once per process (see .driver)
        if create:  # an empty database gets the current schema; any other is left as it is
            create_if_empty(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on normal exit, rolled back on any exception."""
        with self._writer(), self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction, without an ORM session around it.

        The receive path's way in: it runs only prebuilt Core statements, and a session's own
        bookkeeping (identity map, state tracking) cost a received instance a tenth of a
        millisecond for nothing.
        """
        with self._writer(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def index_transaction(self) -> Iterator[IndexTransaction]:
        """The receive path's transaction (see :mod:`.driver`): on SQLite, ``BEGIN IMMEDIATE``
        on the driver's own connection, committed on normal exit and rolled back on any
        exception; on any other database, :meth:`transaction`."""
        if not self.is_sqlite:
            with self.transaction() as conn:
                yield CoreTransaction(conn)
            return
        with self._writer():
            pooled = self.engine.raw_connection()
            try:
                dbapi_conn = pooled.driver_connection
                tx = DriverTransaction(dbapi_conn, self.engine.dialect, self._driver_statements)
                tx.begin()
                try:
                    yield tx
                    tx.commit()
                except BaseException:
                    tx.rollback()
                    raise
            finally:
                pooled.close()  # back to the pool

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """On SQLite: hold the thread lock and the process lock for one transaction."""
        if not self.is_sqlite:
            yield
            return
        with self._thread_lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    self._lock_process()
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _lock_process(self) -> None:
        """Queue behind other processes' transactions on the index (blocking flock: woken at once)."""
        if self._lock_path is None:
            return
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:  # e.g. another user's lock file: SQLite's busy handler still serialises
                log.debug("no process lock on %s (%s): relying on SQLite's busy timeout", self._lock_path, exc)
                self._lock_path = None
                return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let us issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
