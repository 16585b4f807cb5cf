"""What the SR says about the prior study: the comparison container, each finding's change, and
the prior's images as Pertinent Other Evidence (issue 17).

Tree parts written here (``AnalysisResult.comparison`` None: none of them, exactly as before
priors existed)::

    CONTAINS CONTAINER (111424, DCM, "Comparison to previous studies")   after Imaging Measurements
      CONTAINS CODE  Comparison with Prior Study Done = Yes | No
      CONTAINS TEXT  Comment = the comparison sentence (also at the end of the Impression)
      CONTAINS UIDREF Study Instance UID = the prior study          (when known)
      CONTAINS UIDREF Series Instance UID = the prior series        (when known)
      CONTAINS DATE  Study Date = the prior's study date            (when a valid DA)
      CONTAINS NUM   Interval since prior study (d)                 (when known)
    ... in each finding's measurement group (compared only):
      CONTAINS CODE  Qualitative Difference = New | Improving | Stable | Worsening | Resolved

Why the prior's images are evidence and not IMAGE items: they belong to another study, so
PS3.3 C.17.2 puts them in the Pertinent Other Evidence Sequence (never the Current Requested
Procedure Evidence, which lists what was done for this order). The report builder has only their
UIDs, which is all the evidence sequence needs; an IMAGE item would in addition ask a viewer to
find an image that is usually not in the study it opened. The container names the prior study by
UID and date instead, which every SR viewer shows as text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    DateContentItem,
    NumContentItem,
    QualitativeEvaluation,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)
from pydicom import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA

from scp_node.engine.result import AnalysisResult, Comparison, Finding
from scp_node.report import codes
from scp_node.report.text import clean_text, comparison_sentence

logger = logging.getLogger(__name__)

_CONTAINS = RelationshipTypeValues.CONTAINS


def report_comparison(result: AnalysisResult) -> Comparison | None:
    """The comparison the SR reports: None when priors were not looked up or the series was not
    analysed (the model then read no prior either, so there is nothing to say about one)."""
    if result.not_analysed:
        return None
    return result.comparison


def sentence(result: AnalysisResult, language: str) -> str:
    """The impression's sentence on the prior ("" when the SR says nothing about priors)."""
    comparison = report_comparison(result)
    if comparison is None:
        return ""
    structured = result.structured
    return comparison_sentence(
        comparison.status,
        reason=comparison.reason,
        model_sentence=structured.comparison if structured is not None else "",
        prior_study_date=comparison.prior_study_date,
        language=language,
    )


def with_sentence(impression: str, comparison_text: str) -> str:
    """The impression with the comparison sentence at its end (once, even if the model wrote it)."""
    impression = clean_text(impression).strip()
    if not comparison_text or comparison_text in impression:
        return impression
    if not impression:
        return comparison_text
    glue = "" if impression.endswith(("。", "！", "？")) else " "
    return f"{impression}{glue}{comparison_text}"


def change_evaluations(finding: Finding, result: AnalysisResult) -> list[QualitativeEvaluation] | None:
    """The finding's change as a coded qualitative evaluation, when a prior was compared.

    A change from a result whose prior was not compared would claim a comparison that did not
    happen, and an unknown value is not guessed at: both are left out (logged).
    """
    comparison = report_comparison(result)
    if not finding.change:
        return None
    if comparison is None or comparison.status != "compared":
        logger.warning("finding has a change but no prior was compared; change omitted")
        return None
    code = codes.change_code(finding.change)
    if code is None:
        logger.warning("finding change %r is not one of %s; omitted", finding.change[:20],
                       ", ".join(codes.CHANGE_VALUES))
        return None
    return [QualitativeEvaluation(name=codes.CHANGE, value=code)]


def _valid_uid(value: str) -> str:
    uid = UID(str(value or "").strip())
    return str(uid) if uid and uid.is_valid else ""


def _valid_date(value: str) -> DA | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return DA(text)
    except ValueError:
        return None


def comparison_container(result: AnalysisResult, language: str) -> ContainerContentItem | None:
    """The "Comparison to previous studies" container, or None when priors were not looked up."""
    comparison = report_comparison(result)
    if comparison is None:
        return None
    compared = comparison.status == "compared"
    items: list = [
        CodeContentItem(name=codes.COMPARISON_DONE, value=codes.YES if compared else codes.NO,
                        relationship_type=_CONTAINS),
        TextContentItem(name=codes.COMMENT, value=sentence(result, language), relationship_type=_CONTAINS),
    ]
    study_uid = _valid_uid(comparison.prior_study_instance_uid)
    if study_uid:
        items.append(UIDRefContentItem(name=codes.STUDY_INSTANCE_UID, value=study_uid,
                                       relationship_type=_CONTAINS))
    series_uid = _valid_uid(comparison.prior_series_instance_uid)
    if series_uid:
        items.append(UIDRefContentItem(name=codes.SERIES_INSTANCE_UID, value=series_uid,
                                       relationship_type=_CONTAINS))
    date = _valid_date(comparison.prior_study_date)
    if date is not None:
        items.append(DateContentItem(name=codes.STUDY_DATE, value=date, relationship_type=_CONTAINS))
    if comparison.interval_days is not None and comparison.interval_days >= 0:
        items.append(NumContentItem(name=codes.PRIOR_INTERVAL, value=int(comparison.interval_days),
                                    unit=codes.DAYS, relationship_type=_CONTAINS))
    container = ContainerContentItem(name=codes.COMPARISON, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def prior_evidence(result: AnalysisResult, current_study_uid: str) -> list[Dataset]:
    """Minimal headers of the prior images used, for highdicom to list as Pertinent Other Evidence.

    highdicom groups evidence by study and series and files every instance of another study
    under PertinentOtherEvidenceSequence; it reads nothing but the four UIDs set here. Only a
    compared prior's images went into the model, so only those are listed. An image without
    valid UIDs, or one claiming the current study (a prior is an earlier *study*), is left out.
    """
    comparison = report_comparison(result)
    if comparison is None or comparison.status != "compared" or not comparison.prior_sources:
        return []
    study_uid = _valid_uid(comparison.prior_study_instance_uid)
    series_uid = _valid_uid(comparison.prior_series_instance_uid)
    if not study_uid or not series_uid:
        logger.warning("prior study or series UID missing or invalid; prior images not referenced")
        return []
    if study_uid == str(current_study_uid):
        logger.warning("the prior has the current study's UID; not listed as other evidence")
        return []
    headers: list[Dataset] = []
    seen: set[str] = set()
    for ref in comparison.prior_sources:
        sop_class, sop_instance = _valid_uid(ref.sop_class_uid), _valid_uid(ref.sop_instance_uid)
        if not sop_class or not sop_instance:
            logger.warning("prior image without a valid SOP Class/Instance UID omitted from evidence")
            continue
        if sop_instance in seen:  # frames of one instance: one reference
            continue
        seen.add(sop_instance)
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_instance
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        headers.append(ds)
    return headers


def prior_images(comparison: Comparison | None) -> Sequence[dict[str, object]]:
    """The prior images as the sidecar lists them (SOP Class/Instance UID, frame)."""
    if comparison is None:
        return []
    return [{"sop_class_uid": str(r.sop_class_uid), "sop_instance_uid": str(r.sop_instance_uid),
             "frame_number": r.frame_number} for r in comparison.prior_sources]
