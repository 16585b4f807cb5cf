"""Scale-out and priors: claim and lease columns on the queues, the fleet table, prior fetches.

``series.is_prior``; ``claimed_by`` and ``lease_until`` on ``analysis_jobs`` and ``export_jobs``;
the tables ``nodes`` (one row per running node process) and ``prior_fetches``.  Existing rows get
the defaults: not a prior, claimed by nobody, no lease.

Development builds between the first release and Alembic ran ``create_all`` on open, which adds
missing *tables* to an old index but never columns: what is already there is skipped, so such an
index upgrades too.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_CLAIMS = ("analysis_jobs", "export_jobs")


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def _tables() -> set[str]:
    return set(sa.inspect(op.get_bind()).get_table_names())


def upgrade() -> None:
    if "is_prior" not in _columns("series"):
        with op.batch_alter_table("series") as batch:
            batch.add_column(sa.Column("is_prior", sa.Boolean(), nullable=False, server_default="0"))
    for table in _CLAIMS:
        have = _columns(table)
        with op.batch_alter_table(table) as batch:
            if "claimed_by" not in have:
                batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=False, server_default=""))
            if "lease_until" not in have:
                batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    tables = _tables()
    if "nodes" not in tables:
        op.create_table(
            "nodes",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(length=128), nullable=False),
            sa.Column("role", sa.String(length=16), nullable=False),
            sa.Column("host", sa.String(length=255), nullable=False),
            sa.Column("pid", sa.Integer(), nullable=False),
            sa.Column("ae_title", sa.String(length=16), nullable=False),
            sa.Column("version", sa.String(length=32), nullable=False),
            sa.Column("started_at", sa.DateTime(), nullable=False),
            sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
            sa.Column("stopped_at", sa.DateTime(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("name"),
        )
        op.create_index("ix_nodes_heartbeat_at", "nodes", ["heartbeat_at"], unique=False)
    if "prior_fetches" not in tables:
        op.create_table(
            "prior_fetches",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("job_fk", sa.Integer(), nullable=False),
            sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("prior_study_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("prior_series_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("source", sa.String(length=64), nullable=False),
            sa.Column("state", sa.Enum("PENDING", "DONE", "NONE", "FAILED", "REFUSED", name="priorfetchstate",
                                       native_enum=False, create_constraint=False), nullable=False),
            sa.Column("detail", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("finished_at", sa.DateTime(), nullable=True),
            sa.ForeignKeyConstraint(["job_fk"], ["analysis_jobs.id"]),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_prior_fetches_job_fk", "prior_fetches", ["job_fk"], unique=False)
        op.create_index("ix_prior_fetches_prior_study_instance_uid", "prior_fetches", ["prior_study_instance_uid"],
                        unique=False)
        op.create_index("ix_prior_fetches_state", "prior_fetches", ["state"], unique=False)


def downgrade() -> None:
    op.drop_table("prior_fetches")
    op.drop_table("nodes")
    for table in _CLAIMS:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("claimed_by")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("is_prior")
