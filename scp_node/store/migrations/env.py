"""Alembic's environment: the revisions run on the connection the caller handed over.

The caller (:func:`scp_node.store.schema.upgrade`) holds the transaction -- on SQLite the index's
write lock with it -- so the whole upgrade commits or rolls back as one.  ``render_as_batch``
lets a revision alter SQLite tables (``batch_alter_table``); non-native enums stay VARCHAR.
"""

from __future__ import annotations

from alembic import context

from scp_node.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("scp_node's migrations run only through scp-node db upgrade (no connection given)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
