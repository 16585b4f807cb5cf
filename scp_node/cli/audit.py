"""``scp-node audit tail``: the audit trail, printed the way ``tail [-f]`` would."""

from __future__ import annotations

import time
from pathlib import Path

import click
from sqlalchemy import select

from . import config_option, load_config, main


def format_event(e: object) -> str:
    from ..store.models import AuditEvent

    assert isinstance(e, AuditEvent)
    parts = [e.time.isoformat(timespec="milliseconds"), e.event, e.outcome]
    for label, value in (("ae", e.ae_title), ("peer", e.peer), ("study", e.study_instance_uid),
                         ("series", e.series_instance_uid), ("sop", e.sop_instance_uid),
                         ("patient#", e.patient_hash)):
        if value:
            parts.append(f"{label}={value}")
    if e.detail:
        parts.append(f"- {e.detail}")
    return " ".join(parts)


@main.group()
def audit() -> None:
    """Read the audit trail."""


@audit.command("tail")
@config_option
@click.option("-n", "--lines", default=20, show_default=True, help="How many recent events to print.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they are written.")
@click.option("--interval", default=0.5, show_default=True, help="Poll interval for --follow (seconds).")
def tail(config_path: Path, lines: int, follow: bool, interval: float) -> None:
    """Print the last events; with --follow keep printing new ones until Ctrl-C."""
    from ..store.db import Database
    from ..store.models import AuditEvent

    db = Database(load_config(config_path).store.database_url)
    with db.session() as s:
        rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(lines)))
    rows.reverse()
    last_id = rows[-1].id if rows else 0
    for row in rows:
        click.echo(format_event(row))
    try:
        while follow:
            time.sleep(interval)
            with db.session() as s:
                new = list(s.scalars(select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id)))
            for row in new:
                click.echo(format_event(row))
                last_id = row.id
    except KeyboardInterrupt:
        pass
