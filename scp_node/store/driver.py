"""The receive path's statements, run on the SQLite driver's own cursor.

Every received instance runs the same handful of prebuilt Core statements (:mod:`.index`).
Through SQLAlchemy's execution layer -- compiled-cache lookup, execution context, event
dispatch, result wrapping -- each cost about 60 us, and opening and committing the transaction
as much again: measured with four senders, the index transaction was 0.8 ms of CPU per CT
slice, of which ``sqlite3`` itself ran a tenth.  :class:`DriverTransaction` compiles each
statement once with SQLAlchemy (same SQL, same type processing: aware datetimes and enums are
converted by the column types' own bind and result processors) and then runs it on the
``sqlite3`` connection directly.  Driver errors come back as SQLAlchemy's exception classes
(``IntegrityError`` and friends), so callers handle one family of errors on every database.

:class:`CoreTransaction` offers the same three calls on a SQLAlchemy connection: the path every
other database (PostgreSQL) takes, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable, Select


class CoreTransaction:
    """The statements on a SQLAlchemy :class:`Connection` (inside its transaction)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def first(self, stmt: Executable, params: dict[str, Any]) -> tuple[Any, ...] | None:
        row = self.conn.execute(stmt, params).first()
        return None if row is None else tuple(row)

    def run(self, stmt: Executable, params: dict[str, Any]) -> None:
        self.conn.execute(stmt, params)

    def insert(self, stmt: Executable, params: dict[str, Any]) -> int:
        return int(self.conn.execute(stmt, params).inserted_primary_key[0])


_NONE = object()


class _Compiled:
    """One statement compiled for the driver: its SQL, its parameters in order with their bind
    processors, and (for a SELECT) the result processor of each column."""

    def __init__(self, stmt: Executable, keys: Sequence[str], dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
        order = compiled.positiontup
        if order is None:  # pragma: no cover - SQLite's paramstyle is positional
            raise TypeError(f"{dialect.name} does not take positional parameters")
        self.sql = compiled.string
        # Column defaults computed in Python (insert/update "prefetch") need the execution
        # context we skip: the caller must pass those columns.  Values written into the
        # statement itself (``.values(state=...)``) are constants here.
        prefetch = {c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch)}
        self.binds: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        for name in order:
            bind = compiled.binds[name]
            if name not in keys and (name in prefetch or bind.required or bind.callable is not None):
                raise ValueError(f"no value given for {name} in {self.sql!r}")
            constant = _NONE if name in keys else bind.effective_value
            self.binds.append((name, constant, bind.type.dialect_impl(dialect).bind_processor(dialect)))
        self.results: list[Callable[[Any], Any] | None] = (
            [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in stmt.selected_columns]
            if isinstance(stmt, Select) else [])

    def parameters(self, params: dict[str, Any]) -> tuple[Any, ...]:
        values = []
        for name, constant, process in self.binds:
            value = params[name] if constant is _NONE else constant
            values.append(value if process is None else process(value))
        return tuple(values)

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(value if process is None else process(value) for value, process in zip(raw, self.results))


class DriverTransaction:
    """The statements on the ``sqlite3`` connection (the caller owns the transaction)."""

    def __init__(self, dbapi_conn: Any, dialect: Dialect, cache: dict[tuple[Executable, frozenset[str]], _Compiled]) -> None:
        self._conn = dbapi_conn
        self._dialect = dialect
        self._cache = cache
        self._error = dialect.loaded_dbapi.Error

    def begin(self) -> None:
        self._sql("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._sql("COMMIT")

    def rollback(self) -> None:
        """Roll back what is open; never raises (it runs while another exception propagates)."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except self._error:
                pass

    def _sql(self, sql: str) -> None:
        try:
            self._conn.execute(sql)
        except self._error as exc:
            raise DBAPIError.instance(sql, (), exc, self._error) from exc

    def _execute(self, stmt: Executable, params: dict[str, Any]) -> tuple[_Compiled, Any]:
        key = (stmt, frozenset(params))  # (module-level statements: a handful of keys)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._cache[key] = _Compiled(stmt, sorted(params), self._dialect)
        values = compiled.parameters(params)
        try:
            return compiled, self._conn.execute(compiled.sql, values)
        except self._error as exc:
            raise DBAPIError.instance(compiled.sql, values, exc, self._error) from exc

    def first(self, stmt: Executable, params: dict[str, Any]) -> tuple[Any, ...] | None:
        compiled, cursor = self._execute(stmt, params)
        raw = cursor.fetchone()
        return None if raw is None else compiled.row(raw)

    def run(self, stmt: Executable, params: dict[str, Any]) -> None:
        self._execute(stmt, params)

    def insert(self, stmt: Executable, params: dict[str, Any]) -> int:
        return int(self._execute(stmt, params)[1].lastrowid)


IndexTransaction = CoreTransaction | DriverTransaction
