"""``scp-node status``: running or not, port, queue depths, last errors, series not analysed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from . import config_option, load_config, main

#: Same text as scp_node.scheduler.analysis.NOT_ANALYSED_PREFIX (not imported: keeps status light).
NOT_ANALYSED_PREFIX = "not analysed: "


def not_analysed(db: Any, limit: int = 10) -> list[dict[str, Any]]:
    """The latest series the engine could not analyse, with the reason (newest first)."""
    from sqlalchemy import select

    from ..store.models import AnalysisJob, JobState

    with db.session() as s:
        jobs = s.scalars(select(AnalysisJob).where(AnalysisJob.state == JobState.SKIPPED,
                                                   AnalysisJob.error.startswith(NOT_ANALYSED_PREFIX))
                         .order_by(AnalysisJob.id.desc()).limit(limit)).all()
        return [{"job": j.id, "time": (j.finished_at or j.created_at).isoformat(timespec="seconds"),
                 "series_instance_uid": j.series.series_instance_uid, "modality": j.series.modality,
                 "reason": j.error[len(NOT_ANALYSED_PREFIX):]} for j in jobs]


def render_not_analysed(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "not analysed  none"
    lines = [f"not analysed  {len(rows)}" + (" (latest)" if len(rows) >= 10 else "")]
    lines += [f"  {r['time']} {r['modality'] or '?'} series {r['series_instance_uid']}: {r['reason']}" for r in rows]
    return "\n".join(lines)


def prior_fetches(db: Any, limit: int = 5) -> dict[str, Any]:
    """Prior fetches still pending (a C-FIND / C-MOVE in progress) or failed, with the latest
    failures' reasons (scp_node.scheduler.priors; the reasons name PACS, never patients)."""
    from sqlalchemy import func, select

    from ..store.models import PriorFetch, PriorFetchState

    with db.session() as s:
        counts = dict(s.execute(select(PriorFetch.state, func.count()).group_by(PriorFetch.state)).all())
        failed = s.scalars(select(PriorFetch).where(PriorFetch.state == PriorFetchState.FAILED)
                           .order_by(PriorFetch.id.desc()).limit(limit)).all()
        return {"pending": int(counts.get(PriorFetchState.PENDING, 0)),
                "failed": int(counts.get(PriorFetchState.FAILED, 0)),
                "latest_failures": [{"job": f.job_fk, "time": (f.finished_at or f.created_at).isoformat(timespec="seconds"),
                                     "reason": f.detail} for f in failed]}


def render_prior_fetches(info: dict[str, Any]) -> str:
    lines = [f"prior fetches  {info['pending']} pending, {info['failed']} failed"]
    lines += [f"  {r['time']} job {r['job']}: {r['reason']}" for r in info["latest_failures"]]
    return "\n".join(lines)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path, as_json: bool) -> None:
    """Show whether the node runs and what is queued, failed or not analysed (exit 1 when not running)."""
    from ..monitor import collect, render
    from ..store.db import Database

    from ..runtime import schema_problem

    config = load_config(config_path)
    db = Database(config.store.database_url)
    problem = schema_problem(config, db)
    if problem is not None:  # an index behind this version: its tables lack what status reads
        click.echo(f"scp-node: {problem}", err=True)
        raise SystemExit(2)
    st = collect(config, db)
    rows = not_analysed(db)
    priors = prior_fetches(db)
    if as_json:
        click.echo(json.dumps({**json.loads(st.to_json()), "not_analysed": rows, "prior_fetches": priors},
                              indent=2, default=str))
    else:
        click.echo(render(st) + "\n" + render_not_analysed(rows) + "\n" + render_prior_fetches(priors))
    raise SystemExit(0 if st.running else 1)
