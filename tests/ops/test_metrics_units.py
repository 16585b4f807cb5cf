"""The metrics' parts without a node: audit counts since start (settled rows kept as a running
total, newer rows counted at each scrape), the hooks doing nothing when [ops] is off."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import update

from scp_node.audit import AuditTrail
from scp_node.ops.metrics import AuditCounts
from scp_node.store.db import Database
from scp_node.store.models import AuditEvent, utcnow
from tests.support.paths import REPO


def test_audit_counts_since_start_settle_and_stay_exact(index_db: Database, audit_trail: AuditTrail) -> None:
    audit_trail.record("association.accepted")  # before the node started: not counted
    counts = AuditCounts(index_db)
    for _ in range(3):
        audit_trail.record("association.accepted")
    audit_trail.record("association.rejected", outcome="failure")
    assert counts.counts() == {("association.accepted", "success"): 3, ("association.rejected", "failure"): 1}
    with index_db.session() as s:  # age them: they settle into the running total at the next scrape
        s.execute(update(AuditEvent).values(time=utcnow() - timedelta(minutes=5)))
    assert counts.counts()[("association.accepted", "success")] == 3
    assert counts._settled[("association.accepted", "success")] == 3
    audit_trail.record("association.accepted")
    assert counts.counts() == {("association.accepted", "success"): 4, ("association.rejected", "failure"): 1}
    assert counts.counts() == {("association.accepted", "success"): 4, ("association.rejected", "failure"): 1}


def test_hooks_are_off_without_ops_and_never_import_prometheus() -> None:
    code = ("import sys, time; from scp_node.ops import stats; from scp_node.store import ingest; "
            "stats.stored('dimse', 'stored', 0.1, 10); stats.stage('x', 1.0); "
            "print('prometheus_client' in sys.modules, stats.folder())")
    env = {k: v for k, v in os.environ.items() if k not in ("SCP_NODE_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.stdout.strip() == "False None", out.stderr[-2000:]
