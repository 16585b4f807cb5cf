"""Series completion, as mercure decides it: quiet for N seconds, or a forced ceiling.

The timer is the ``last_received_at`` column, so the decision survives a restart: a series that
was receiving when the node stopped is judged by the same clock when it starts again.  Marking
a series complete and queuing its analysis job happen in one transaction.  Several workers may
run this at once on a shared PostgreSQL index: the due series are selected ``FOR UPDATE SKIP
LOCKED``, so each is closed (and its job queued, its completion audited) by exactly one of them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from ..audit import AuditTrail, Event
from ..store.db import Database
from ..store.models import AnalysisJob, PriorFetch, Series, SeriesState, utcnow

log = logging.getLogger(__name__)


class SeriesCompletion:
    """Finds series whose receive window has closed and queues one analysis job per version."""

    def __init__(self, db: Database, audit: AuditTrail, stable_seconds: float, max_wait_seconds: float) -> None:
        self.db = db
        self.audit = audit
        self.stable = timedelta(seconds=stable_seconds)
        self.max_wait = timedelta(seconds=max_wait_seconds)

    def run_once(self, now: datetime | None = None) -> int:
        """Close every due series; return how many were closed."""
        now = now or utcnow()
        closed = 0
        with self.db.session() as session:
            due = session.scalars(
                select(Series).where(
                    Series.state == SeriesState.RECEIVING,
                    or_(Series.last_received_at <= now - self.stable,
                        Series.version_started_at <= now - self.max_wait))
                .with_for_update(skip_locked=True, of=Series)).all()
            for series in due:
                forced = series.last_received_at > now - self.stable
                series.state = SeriesState.COMPLETE
                series.completed_at = now
                if not series.is_prior and session.scalars(select(PriorFetch.id).where(
                        PriorFetch.prior_study_instance_uid == series.study.study_instance_uid,
                        PriorFetch.source != "local").limit(1)).first():
                    # retrieved from a PACS as a prior while it was still arriving (a prior found in
                    # the local index was received, and analysed, as any study: new series of it too)
                    series.is_prior = True
                if series.is_prior:  # a retrieved prior is kept for comparison, never analysed
                    self.audit.add(session, Event.SERIES_COMPLETE, study_uid=series.study.study_instance_uid,
                                   series_uid=series.series_instance_uid,
                                   patient_id=series.study.patient.patient_id,
                                   detail=f"version {series.version}, {len(series.instances)} instances; "
                                          "a retrieved prior: not analysed")
                    closed += 1
                    continue
                exists = session.scalars(select(AnalysisJob).where(
                    AnalysisJob.series_fk == series.id,
                    AnalysisJob.series_version == series.version)).first()
                if exists is None:
                    session.add(AnalysisJob(series=series, series_version=series.version))
                count = len(series.instances)
                self.audit.add(session, Event.SERIES_COMPLETE,
                               study_uid=series.study.study_instance_uid,
                               series_uid=series.series_instance_uid,
                               patient_id=series.study.patient.patient_id,
                               detail=f"version {series.version}, {count} instances"
                                      + (", forced by the ceiling" if forced else ""))
                closed += 1
        if closed:
            log.info("%d series complete", closed)
        return closed
