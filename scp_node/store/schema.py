"""Which revision of the index schema a database holds, and bringing it to this scp_node's.

Alembic owns the schema (:mod:`scp_node.store.migrations`): ``scp-node db upgrade`` runs its
revisions.  What every process does on open stays cheap and never imports Alembic: one look at
the table names, and for a schema that exists, one row of ``alembic_version``.

* An empty database gets the whole current schema at once (``create_all``) and is stamped with
  :data:`HEAD`: a fresh index needs no migration history.
* A database with the node's tables but no ``alembic_version`` is an index made by the first
  release (which ran ``create_all`` itself): it is at :data:`FIRST_RELEASE`.  Opening it changes
  nothing; ``scp-node db upgrade`` stamps it and runs the revisions after that one.
* ``serve`` refuses to start on a schema that is not :data:`HEAD` (:func:`ensure_current`), and
  names the command that fixes it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Column, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Connection

from .models import Base


class Database(Protocol):
    """What of :class:`scp_node.store.db.Database` is used here (which imports this module)."""

    def transaction(self) -> AbstractContextManager[Connection]: ...

#: The revision this code's models are (the newest file in migrations/versions; a test checks).
HEAD = "0002"
#: The schema the first release created (before Alembic); such an index has no version table.
FIRST_RELEASE = "0001"
VERSION_TABLE = "alembic_version"
#: Alembic's own version table, as it creates it (written here without importing Alembic).
_version = Table(VERSION_TABLE, MetaData(), Column("version_num", String(32), primary_key=True))
#: PostgreSQL advisory lock key: two processes opening one empty database create it once.
_CREATE_LOCK = 0x5C9_0DE


class SchemaError(RuntimeError):
    """The index's schema is not the one this scp_node works with; the message says what to do."""


def current_revision(conn: Connection) -> str | None:
    """The schema revision of the database behind ``conn``: None when it has no tables at all,
    :data:`FIRST_RELEASE` for a first-release index (tables, no version table)."""
    names = set(inspect(conn).get_table_names())
    if VERSION_TABLE in names:
        versions = list(conn.execute(select(_version.c.version_num)).scalars())
        if len(versions) != 1:
            raise SchemaError(f"the index's {VERSION_TABLE} table holds {len(versions)} rows, expected one")
        return str(versions[0])
    if not names:
        return None
    if names & set(Base.metadata.tables):
        return FIRST_RELEASE
    raise SchemaError(f"the database holds tables ({', '.join(sorted(names)[:5])}...) but none of an "
                      "scp_node index: is database_url the right database?")


def create_if_empty(db: Database) -> bool:
    """On an empty database: the current schema, stamped :data:`HEAD`, in one transaction (True).
    Anything else is left as it is (False): a non-empty index is changed by ``db upgrade`` only."""
    with db.transaction() as conn:  # (on SQLite: the index's write lock, as every transaction)
        if inspect(conn).get_table_names():
            return False
        if conn.dialect.name == "postgresql":  # another process may be creating it right now
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
            if inspect(conn).get_table_names():
                return False
        Base.metadata.create_all(conn)
        _version.create(conn)
        conn.execute(_version.insert().values(version_num=HEAD))
    return True


def revision_of(db: Database) -> str | None:
    with db.transaction() as conn:
        return current_revision(conn)


def upgrade_command(config_source: Path | str | None) -> str:
    return f"scp-node db upgrade --config {config_source or 'F'}"


def ensure_current(db: Database, config_source: Path | str | None = None) -> None:
    """Raise :class:`SchemaError` unless the index is at :data:`HEAD` (the check ``serve`` runs)."""
    at = revision_of(db)
    if at is None or at == HEAD:  # (an empty database is created on open: None only for create=False)
        return
    if at in known_revisions():
        raise SchemaError(f"the index schema is at revision {at}, this scp_node needs {HEAD}: run "
                          f"`{upgrade_command(config_source)}` (back up the index first)")
    raise SchemaError(f"the index schema is at revision {at}, which this scp_node (schema {HEAD}) does not "
                      "know: it was written by a newer scp_node; run that version, or restore a backup")


def known_revisions() -> set[str]:
    """The revisions in migrations/versions (file names ``<rev>_<slug>.py``; read without Alembic)."""
    folder = Path(__file__).parent / "migrations" / "versions"
    return {p.name.split("_", 1)[0] for p in folder.glob("[0-9]*_*.py")}


def upgrade(db: Database, target: str = "head") -> tuple[str | None, str]:
    """Run the Alembic revisions up to ``target`` in one transaction; (revision before, after).

    A first-release index is stamped :data:`FIRST_RELEASE` first (in the same transaction); an
    empty database is simply created at :data:`HEAD`.
    """
    from alembic import command
    from alembic.util import CommandError

    from .migrations import alembic_config

    before = revision_of(db)
    if before is None:
        create_if_empty(db)
        return None, HEAD
    with db.transaction() as conn:
        cfg = alembic_config(conn)
        try:
            if current_revision(conn) == FIRST_RELEASE and not inspect(conn).has_table(VERSION_TABLE):
                command.stamp(cfg, FIRST_RELEASE)
            command.upgrade(cfg, target)
        except CommandError as exc:  # e.g. an unknown revision, or one below the index's
            raise SchemaError(f"cannot upgrade the index to {target!r}: {exc}") from None
        after = current_revision(conn)
    assert after is not None
    return before, after


def heads() -> list[str]:
    """The head revision(s) of the migration scripts, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    from .migrations import alembic_config

    return list(ScriptDirectory.from_config(alembic_config(None)).get_heads())


def describe(db: Database) -> dict[str, Any]:
    """For ``scp-node db current``: where the index is and where this code is."""
    at = revision_of(db)
    return {"current": at, "head": HEAD, "up_to_date": at == HEAD,
            "first_release_unstamped": at == FIRST_RELEASE and not _has_version_table(db)}


def _has_version_table(db: Database) -> bool:
    with db.transaction() as conn:
        return inspect(conn).has_table(VERSION_TABLE)
