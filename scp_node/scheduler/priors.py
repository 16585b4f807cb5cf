"""The prior study of a series: found in the index, or searched for and retrieved from a PACS.

Why: a radiologist reads a new film against the last one.  :class:`PriorLookup` is the analysis
queue's :class:`~scp_node.scheduler.analysis.PriorFinder`: for each claimed job it

1. reads the current series' facts from one of its files (scp_node.scheduler.prior_rules);
2. looks in the **local index** for the patient's most recent earlier comparable series (complete,
   or retrieved as a prior), by the rules of :func:`choose_prior`;
3. only when there is none, asks each ``[[priors]]`` source in turn: C-FIND at study level
   (Patient ID, Issuer, a Study Date range), newest study first, then C-FIND at series level;
   the comparable series is retrieved by C-MOVE to the node's own AE title (or C-GET).  The
   :class:`~scp_node.store.models.PriorFetch` row names the prior study **before** the C-MOVE, so
   the series completion knows the arriving series is a prior and never queues its analysis; the
   retrieved series is flagged ``is_prior``.  Everything asked of one source is bounded by its
   ``timeout_seconds``: a PACS that is down or slow costs at most that, and the analysis goes on
   without a prior and says so (Comparison "unavailable");
4. checks that the two studies are the same person: Patient ID + Issuer (the search key), then
   Patient's Sex and Birth Date from both studies -- from the C-FIND answer before anything is
   retrieved, and from the files' headers before anything is compared.  A difference stops the
   comparison (PriorFetch REFUSED, Comparison "not_comparable", an audit row saying which
   attribute differs, never its values).

Every C-FIND, C-MOVE / C-GET and outcome is an audit row; the job's PriorFetch row says how it
went (``scp-node status`` lists pending and failed ones).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pydicom
from sqlalchemy import or_, select, update

from ..audit import AuditTrail, Event
from ..config import PriorSource
from ..dimse.query_retrieve import QueryRetrieveError, QueryRetrieveSCU, RetrieveOutcome
from ..engine.result import Comparison, PriorStudy
from ..store.db import Database
from ..store.ingest import Ingestor, Origin
from ..store.models import (Instance, Patient, PriorFetch, PriorFetchState, Series, SeriesState, Study,
                            utcnow)
from .prior_rules import (HEADER_KEYWORDS, SeriesFacts, choose_prior, facts_from_header, family,
                          identity_conflict, interval_days, is_earlier, parse_da, same_patient_id)

__all__ = ["PriorLookup", "choose_prior"]

log = logging.getLogger(__name__)

#: At most this many of a patient's studies are asked for their series at one source.
MAX_STUDIES_PER_SOURCE = 10


def read_facts(path: Path) -> SeriesFacts:
    """The rules' facts from one file's header (pixel data never read)."""
    return facts_from_header(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS)))


#: What the queue gets: the prior for the engine (None: none) and what the report says about it.
Answer = tuple[PriorStudy | None, Comparison]


class PriorLookup:
    """Finds, checks and (from a PACS) retrieves the prior of each analysed series."""

    def __init__(self, db: Database, audit: AuditTrail, storage_dir: Path, sources: tuple[PriorSource, ...], *,
                 own_ae_title: str, lookback_days: int = 1825, ingestor: Ingestor | None = None) -> None:
        """``ingestor``: where C-GET's instances go (the node's own: kept and indexed like any
        C-STORE); without one, every source retrieves by C-MOVE."""
        self.db, self.audit, self.storage_dir = db, audit, storage_dir
        self.sources, self.own_ae_title, self.lookback_days = sources, own_ae_title, lookback_days
        self.ingestor = ingestor

    # -- the queue's call ----------------------------------------------------------------------
    def find(self, job_id: int, series_uid: str) -> tuple[PriorStudy | None, Comparison]:
        current_path = self._first_file(series_uid)
        if current_path is None:
            return None, Comparison(status="none", reason="the series has no instance in the index")
        current = read_facts(current_path)
        return self._search(self._begin(job_id, current), current)

    def _search(self, fetch_id: int, current: SeriesFacts) -> Answer:
        if not family(current.modality):
            return self._none(fetch_id, current, f"no prior is compared for modality {current.modality or '(none)'}")
        if parse_da(current.study_date) is None:
            return self._none(fetch_id, current, "the current study has no Study Date")
        if not current.patient_id:
            return self._none(fetch_id, current, "the current study has no Patient ID")
        local = choose_prior(current, self._local_candidates(current), self.lookback_days)
        if local is not None:
            return self._use(fetch_id, current, local, "local")
        failures: list[str] = []
        for source in self.sources:
            try:
                answer = self._search_source(fetch_id, current, source)
            except QueryRetrieveError as exc:
                failures.append(str(exc))
                log.warning("prior search at %s failed: %s", source.name, exc)
                continue
            if answer is not None:
                return answer
        if failures:
            reason = "; ".join(failures)
            self._finish(fetch_id, PriorFetchState.FAILED, reason[:2000])
            self.audit.record(Event.PRIOR_NONE, outcome="failure", study_uid=current.study_instance_uid,
                              series_uid=current.series_instance_uid, patient_id=current.patient_id,
                              detail=f"no prior compared: {reason}"[:2000])
            return None, Comparison(status="unavailable", reason=reason)
        where = ", ".join(["the local index"] + [f"PACS {s.name}" for s in self.sources])
        return self._none(fetch_id, current, f"no earlier comparable study of this patient in {where}")

    # -- local index ---------------------------------------------------------------------------
    def _first_file(self, series_uid: str) -> Path | None:
        with self.db.session() as s:
            rel = s.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == series_uid)
                            .order_by(Instance.instance_number, Instance.id).limit(1)).first()
        return None if rel is None else self.storage_dir / rel

    def _local_candidates(self, current: SeriesFacts) -> list[SeriesFacts]:
        """The patient's other series in the index (complete, or retrieved priors) that the index
        alone cannot rule out, each with the facts of its first file."""
        earliest = parse_da(current.study_date) - timedelta(days=self.lookback_days)  # type: ignore[operator]
        with self.db.session() as s:
            rows = s.execute(
                select(Series.id, Series.modality, Study.study_date).join(Study).join(Patient)
                .where(Patient.patient_id == current.patient_id,
                       Patient.issuer_of_patient_id == current.issuer_of_patient_id,
                       Study.study_instance_uid != current.study_instance_uid,
                       Study.study_date <= current.study_date, Study.study_date >= earliest.strftime("%Y%m%d"),
                       or_(Series.state == SeriesState.COMPLETE, Series.is_prior.is_(True)))).all()
            paths = []
            for series_id, modality, _ in rows:
                if family(modality) != family(current.modality):
                    continue
                rel = s.scalars(select(Instance.path).where(Instance.series_fk == series_id)
                                .order_by(Instance.instance_number, Instance.id).limit(1)).first()
                if rel is not None:
                    paths.append(self.storage_dir / rel)
        facts = []
        for path in paths:
            try:
                facts.append(read_facts(path))
            except Exception as exc:  # noqa: BLE001 - an unreadable file is no prior, not a failure
                log.warning("prior candidate %s unreadable: %s", path.name, type(exc).__name__)
        return facts

    # -- a PACS --------------------------------------------------------------------------------
    def _search_source(self, fetch_id: int, current: SeriesFacts, source: PriorSource) -> Answer | None:
        """C-FIND studies then series at ``source``; retrieve the first comparable series found.
        None: the source has none; QueryRetrieveError: it could not be searched or did not deliver."""
        scu = QueryRetrieveSCU(source, self.own_ae_title)
        ids = dict(ae_title=source.ae_title, peer=f"{source.host}:{source.port}", study_uid=current.study_instance_uid,
                   series_uid=current.series_instance_uid, patient_id=current.patient_id)
        start = parse_da(current.study_date) - timedelta(days=min(source.lookback_days, self.lookback_days))  # type: ignore[operator]
        try:
            studies = scu.find_studies(current.patient_id, current.issuer_of_patient_id,
                                       start.strftime("%Y%m%d"), current.study_date)
        except QueryRetrieveError as exc:
            self.audit.record(Event.PRIOR_QUERY, outcome="failure", detail=f"C-FIND study level at {source.name}: {exc}",
                              **ids)
            raise
        wanted = [st for st in studies if st.study_instance_uid != current.study_instance_uid
                  and same_patient_id(current, SeriesFacts("", "", patient_id=st.patient_id,
                                                           issuer_of_patient_id=st.issuer_of_patient_id))
                  and is_earlier(current, SeriesFacts("", "", study_date=st.study_date, study_time=st.study_time))
                  and (not st.modalities or any(family(m) == family(current.modality) for m in st.modalities))]
        wanted.sort(key=lambda st: (st.study_date, st.study_time), reverse=True)
        found = _count(len(studies), "study", "studies")
        self.audit.record(Event.PRIOR_QUERY, detail=f"C-FIND study level at {source.name}: {found}, "
                                                    f"{len(wanted)} earlier with a comparable modality", **ids)
        for study in wanted[:MAX_STUDIES_PER_SOURCE]:
            try:
                series = scu.find_series(study.study_instance_uid)
            except QueryRetrieveError as exc:
                self.audit.record(Event.PRIOR_QUERY, outcome="failure",
                                  detail=f"C-FIND series level at {source.name} in study {study.study_instance_uid}: "
                                         f"{exc}", **ids)
                raise
            candidates = [SeriesFacts(study.study_instance_uid, se.series_instance_uid, study.study_date,
                                      study.study_time, se.modality, se.body_part_examined, se.view_position,
                                      se.series_description, study.patient_id, study.issuer_of_patient_id,
                                      study.patient_sex, study.patient_birth_date) for se in series]
            chosen = choose_prior(current, candidates, self.lookback_days)
            self.audit.record(Event.PRIOR_QUERY, detail=f"C-FIND series level at {source.name} in study "
                                                        f"{study.study_instance_uid}: {len(series)} series, "
                                                        + ("one comparable" if chosen else "none comparable"), **ids)
            if chosen is None:
                continue
            conflict = identity_conflict(current, chosen)
            if conflict:  # the C-FIND answer already says so: nothing of the other person is retrieved
                return self._refuse(fetch_id, current, chosen, source.name, conflict, "the PACS's C-FIND answer")
            return self._retrieve(fetch_id, current, chosen, scu, ids)
        return None

    def _retrieve(self, fetch_id: int, current: SeriesFacts, chosen: SeriesFacts, scu: QueryRetrieveSCU,
                  ids: dict[str, str]) -> Answer:
        source = scu.source
        how = "C-GET" if source.retrieve == "c-get" and self.ingestor is not None else "C-MOVE"
        with self.db.session() as s:  # named before the move: its series arrive as a prior
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            fetch.prior_study_instance_uid = chosen.study_instance_uid
            fetch.prior_series_instance_uid = chosen.series_instance_uid
            fetch.source = source.name[:64]
            fetch.detail = f"retrieving by {how} from {source.name}"
        try:
            if how == "C-GET":
                assert self.ingestor is not None
                ingestor, origin = self.ingestor, Origin(ae_title=source.ae_title, address=source.host, via="dimse")
                outcome: RetrieveOutcome = scu.get_series(
                    chosen.study_instance_uid, chosen.series_instance_uid,
                    lambda data, sop_class: ingestor.ingest(data, origin, expected_sop_class=sop_class))
            else:
                outcome = scu.move_series(chosen.study_instance_uid, chosen.series_instance_uid)
        except QueryRetrieveError as exc:
            self.audit.record(Event.PRIOR_RETRIEVE, outcome="failure",
                              detail=f"{how} of series {chosen.series_instance_uid} from {source.name}: {exc}", **ids)
            raise
        finally:  # what arrived, all or part of it, is a prior: kept, never analysed
            with self.db.session() as s:
                s.execute(update(Series).where(Series.series_instance_uid == chosen.series_instance_uid)
                          .values(is_prior=True))
        counts = f"{outcome.completed} completed, {outcome.failed} failed, {outcome.warning} warning"
        path = self._first_file(chosen.series_instance_uid)
        ok = path is not None
        self.audit.record(Event.PRIOR_RETRIEVE, outcome="success" if ok and not outcome.failed else
                          ("warning" if ok else "failure"),
                          detail=f"{how} of series {chosen.series_instance_uid} from {source.name} "
                                 f"(to {source.move_destination if how == 'C-MOVE' else self.own_ae_title}): {counts}",
                          **ids)
        if path is None:
            raise QueryRetrieveError(
                f"{how} from PACS {source.name} completed {outcome.completed} sub-operations but no instance of the "
                f"series reached the index (does the PACS know {source.move_destination} as this node?)")
        return self._use(fetch_id, current, read_facts(path), source.name)

    # -- outcomes ------------------------------------------------------------------------------
    def _use(self, fetch_id: int, current: SeriesFacts, prior: SeriesFacts, source: str) -> Answer:
        """Check identity against the prior's own files, then hand the prior over."""
        conflict = identity_conflict(current, prior)
        if conflict:
            return self._refuse(fetch_id, current, prior, source, conflict, "the files' headers")
        with self.db.session() as s:
            rels = s.scalars(select(Instance.path).join(Series)
                             .where(Series.series_instance_uid == prior.series_instance_uid)
                             .order_by(Instance.instance_number, Instance.id)).all()
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            fetch.prior_study_instance_uid = prior.study_instance_uid
            fetch.prior_series_instance_uid = prior.series_instance_uid
            fetch.source, fetch.state, fetch.finished_at = source[:64], PriorFetchState.DONE, utcnow()
            days = interval_days(current.study_date, prior.study_date)
            fetch.detail = f"prior of {prior.study_date} ({days} days earlier), {len(rels)} instances, from {source}"
            self.audit.add(s, Event.PRIOR_FOUND, study_uid=current.study_instance_uid,
                           series_uid=current.series_instance_uid, patient_id=current.patient_id,
                           detail=f"prior study {prior.study_instance_uid} series {prior.series_instance_uid}: "
                                  f"{fetch.detail}")
        study = PriorStudy(study_instance_uid=prior.study_instance_uid, series_instance_uid=prior.series_instance_uid,
                           study_date=prior.study_date, paths=tuple(str(self.storage_dir / r) for r in rels),
                           source=source, interval_days=days)
        return study, Comparison(status="compared", prior_study_instance_uid=prior.study_instance_uid,
                                 prior_series_instance_uid=prior.series_instance_uid,
                                 prior_study_date=prior.study_date, interval_days=days, source=source)

    def _refuse(self, fetch_id: int, current: SeriesFacts, prior: SeriesFacts, source: str, conflict: str,
                seen_in: str) -> Answer:
        reason = f"prior not comparable: {conflict}"
        with self.db.session() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            fetch.prior_study_instance_uid = prior.study_instance_uid
            fetch.prior_series_instance_uid = prior.series_instance_uid
            fetch.source, fetch.state, fetch.finished_at = source[:64], PriorFetchState.REFUSED, utcnow()
            fetch.detail = f"{reason} (seen in {seen_in}); no comparison made"
            self.audit.add(s, Event.PRIOR_REFUSED, outcome="warning", study_uid=current.study_instance_uid,
                           series_uid=current.series_instance_uid, patient_id=current.patient_id,
                           detail=f"{reason}: prior study {prior.study_instance_uid} from {source}, seen in "
                                  f"{seen_in}; no comparison made")
        log.warning("prior of series %s refused: %s", current.series_instance_uid, reason)
        return None, Comparison(status="not_comparable", reason=reason, source=source)

    def _none(self, fetch_id: int, current: SeriesFacts, reason: str) -> Answer:
        self._finish(fetch_id, PriorFetchState.NONE, reason)
        self.audit.record(Event.PRIOR_NONE, study_uid=current.study_instance_uid,
                          series_uid=current.series_instance_uid, patient_id=current.patient_id, detail=reason)
        return None, Comparison(status="none", reason=reason)

    def _begin(self, job_id: int, current: SeriesFacts) -> int:
        """The job's PriorFetch row, PENDING (a job run again reuses its row)."""
        with self.db.session() as s:
            fetch = s.scalars(select(PriorFetch).where(PriorFetch.job_fk == job_id)).first()
            if fetch is None:
                fetch = PriorFetch(job_fk=job_id, study_instance_uid=current.study_instance_uid)
                s.add(fetch)
            # The prior UIDs of an earlier attempt stay until a new prior is chosen: the series
            # completion reads them to know that a series still arriving from that attempt is a prior.
            fetch.state, fetch.detail, fetch.finished_at = PriorFetchState.PENDING, "searching", None
            s.flush()
            return int(fetch.id)

    def _finish(self, fetch_id: int, state: PriorFetchState, detail: str) -> None:
        with self.db.session() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            fetch.state, fetch.detail, fetch.finished_at = state, detail[:4000], utcnow()


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
