"""Build the Comprehensive 3D SR (TID 1500) that carries one AnalysisResult back to the PACS.

Document-level decisions (why):

* Patient and study come from ``evidence`` through highdicom, never copied by hand, so the SR
  files under exactly the study that was analysed.
* A new series (default Series Number 9901) so AI output is never mixed into acquired series.
* VerificationFlag UNVERIFIED and PreliminaryFlag PRELIMINARY: no physician has signed it.
* CompletionFlag COMPLETE when the model produced text: the document then holds everything
  this node will ever say about the series (content completeness, which is what the flag is
  about; verification is a separate flag). PARTIAL when the answer was empty, because the
  report then lacks its main content (a placeholder is written instead).
* A prior study compared with the series (``result.comparison``) is another study: its images
  go to the Pertinent Other Evidence Sequence, never to the Current Requested Procedure
  Evidence (what this order produced); see ``scp_node.report.comparison``.
* Specific Character Set ISO_IR 192 when any text written (ours or the source's) is not ASCII,
  and always for a Chinese report; otherwise the source's set is kept, so old PACS that only
  handle the default repertoire are not bothered.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections import OrderedDict
from collections.abc import Sequence

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import Comprehensive3DSR
from pydicom import Dataset, valuerep
from pydicom.uid import ExplicitVRLittleEndian

from scp_node import IMPLEMENTATION_VERSION_NAME
from scp_node.engine.result import AnalysisResult
from scp_node.report import codes
from scp_node.report.comparison import prior_evidence, report_comparison
from scp_node.report.content import SourceImage, build_content, report_language
from scp_node.report.equipment import model_equipment
from scp_node.report.creator import ReportingNode
from scp_node.report.text import (
    EMPTY_FINDINGS_PLACEHOLDER,
    UTF8_CHARACTER_SET,
    clean_text,
    is_ascii,
    not_analysed_text,
    series_description,
)
from scp_node.report.uids import implementation_class_uid, model_device_uid, new_uid

logger = logging.getLogger(__name__)

#: Type 2 attributes highdicom reads from ``evidence[0]`` with attribute access; real headers
#: omit some of them (e.g. no Study ID in ``CR-MONO1-10-chest_barre.dcm``).
_TYPE2_READ_BY_HIGHDICOM = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_PATIENT_SEX_VALUES = {"M", "F", "O", ""}


def _first_evidence_for_highdicom(first: Dataset) -> Dataset:
    """A shallow copy of the first evidence header that highdicom can read without failing.

    Missing Type 2 attributes are added empty (the SR must have them anyway, and empty is
    what the source said). A Patient's Sex outside M/F/O would make highdicom raise; it is
    written empty instead. Nothing else is changed; values are never logged.
    """
    patched = Dataset()
    for element in first:
        patched.add(element)
    for keyword in _TYPE2_READ_BY_HIGHDICOM:
        if keyword not in patched:
            setattr(patched, keyword, None)
    if str(patched.PatientSex or "").strip() not in _PATIENT_SEX_VALUES:
        logger.warning("source Patient's Sex is not M/F/O; written empty in the SR")
        patched.PatientSex = None
    for keyword, vr in _DATE_TIME_READ_BY_HIGHDICOM.items():
        _repair_date_time(patched, keyword, vr)
    return patched


#: Date/time attributes highdicom converts to DA/TM objects; hospital data has broken ones
#: (a de-identifier's hash in a date, ACR-NEMA "HH:MM:SS" times).
_DATE_TIME_READ_BY_HIGHDICOM = {"PatientBirthDate": "DA", "StudyDate": "DA", "StudyTime": "TM"}


def _repair_date_time(patched: Dataset, keyword: str, vr: str) -> None:
    """Keep a convertible value; repair the old colon/dot forms; else write it empty (Type 2).

    An unconvertible value would make highdicom raise and the whole report fail, which loses
    the analysis for a cosmetic header problem.
    """
    raw = patched.get(keyword)
    if raw in (None, ""):
        return
    cls = valuerep.DA if vr == "DA" else valuerep.TM
    text = str(raw).strip()
    for candidate in (text, text.replace(":", "") if vr == "TM" else text.replace(".", "")):
        try:
            cls(candidate)
        except (ValueError, TypeError, OverflowError):
            continue
        if candidate != text:
            setattr(patched, keyword, candidate)
        return
    logger.warning("source %s is not a valid %s; written empty in the SR", keyword, vr)
    setattr(patched, keyword, None)


def _resolve_sources(evidence: Sequence[Dataset], result: AnalysisResult) -> list[SourceImage]:
    """Map ``result.sources`` to evidence headers, merging frames of the same instance.

    No sources means the engine did not say which instances it used; then every evidence
    instance counts as a source. A source missing from ``evidence`` is an upstream error:
    the SR could not list it in the evidence sequence, so it is refused.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    if not result.sources:
        return [SourceImage(ds) for ds in by_uid.values()]
    frames: OrderedDict[str, list[int]] = OrderedDict()
    for ref in result.sources:
        uid = str(ref.sop_instance_uid)
        if uid not in by_uid:
            raise ValueError(f"source instance {uid} is not among the evidence headers")
        if str(by_uid[uid].SOPClassUID) != str(ref.sop_class_uid):
            raise ValueError(f"source instance {uid} has a different SOP Class in the evidence")
        frames.setdefault(uid, [])
        if ref.frame_number is not None:
            if ref.frame_number < 1:
                raise ValueError(f"frame numbers are 1-based, got {ref.frame_number}")
            if ref.frame_number not in frames[uid]:
                frames[uid].append(ref.frame_number)
    return [SourceImage(by_uid[uid], tuple(sorted(f))) for uid, f in frames.items()]


def _check_evidence(evidence: Sequence[Dataset], series_instance_uid: str) -> None:
    """One study only, and the SR series must be new (never one of the source series)."""
    if not evidence:
        raise ValueError("no evidence: the SR needs the source headers for patient and study")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError("evidence spans more than one study; one SR describes one study")
    source_series = {str(ds.SeriesInstanceUID) for ds in evidence}
    if series_instance_uid in source_series:
        raise ValueError("series_instance_uid must be a new series, not a source series")


#: Value representations whose values are character strings affected by Specific Character Set.
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}


def _strings(dataset: Dataset):
    """Every character-set-dependent string in ``dataset`` and its sequences (for the choice of
    Specific Character Set: one non-ASCII value anywhere needs ISO_IR 192)."""
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _strings(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield str(value)


def _content_datetime(value: datetime.datetime | None) -> datetime.datetime:
    """Content date/time as local wall-clock time (DA/TM carry no offset)."""
    if value is None:
        return datetime.datetime.now().astimezone()
    if value.tzinfo is None:
        return value.astimezone()
    return value


def _utc_offset(value: datetime.datetime) -> str:
    """Timezone Offset From UTC (SH, "+HHMM") of an aware datetime."""
    offset = value.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def _says_interval(result: AnalysisResult) -> bool:
    """True when the SR writes the private "Interval since prior study" concept."""
    comparison = report_comparison(result)
    return comparison is not None and comparison.interval_days is not None and comparison.interval_days >= 0


def build_measurement_report(
    evidence: Sequence[pydicom.Dataset],
    result: AnalysisResult,
    *,
    node: ReportingNode,
    series_instance_uid: str | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> Comprehensive3DSR:
    """Build the AI findings SR for one analysed series.

    ``evidence`` are the headers of the source instances (pixel data not needed); all must
    belong to one study, and every ``result.sources`` entry must be among them. The returned
    object is not written anywhere; use :func:`scp_node.report.storage.write_report`.
    """
    series_uid = str(series_instance_uid) if series_instance_uid else str(new_uid())
    _check_evidence(evidence, series_uid)
    sources = _resolve_sources(evidence, result)

    when = _content_datetime(content_datetime)
    model = result.model
    device_uid = model_device_uid(model)

    if result.not_analysed:
        # A series the engine could not analyse: the SR only says so and why (no structured findings).
        result = dataclasses.replace(result, structured=None, parse_error="",
                                     findings_text=not_analysed_text(report_language(result), result.not_analysed))
    findings = clean_text(result.findings_text)
    findings_value = findings if findings.strip() else EMPTY_FINDINGS_PLACEHOLDER

    content = build_content(
        result,
        sources,
        node=node,
        device_uid=str(device_uid),
        findings_text=findings_value,
    )
    equipment = model_equipment(
        model,
        node,
        device_uid=str(device_uid),
        prompt_profile=result.prompt_profile,
        contribution_datetime=when,
    )

    # Our strings: the content tree, the equipment item and the General Equipment values.
    our_text = [
        *_strings(content[0]),
        *_strings(equipment),
        node.manufacturer,
        node.institution_name,
        node.manufacturer_model_name,
        node.software_version,
        node.effective_station_name,
        node.device_serial_number,
        node.institutional_department_name,
    ]
    if report_language(result) == "zh" or not is_ascii(our_text):
        character_set = UTF8_CHARACTER_SET
    else:
        character_set = evidence[0].get("SpecificCharacterSet")
    coding_schemes = [
        CodingSchemeIdentificationItem(
            designator=scheme["designator"],
            name=scheme["name"],
            responsible_organization=scheme["responsible_organization"],
        )
        for scheme in (
            (codes.IHE_CODING_SCHEME, codes.SCP_NODE_CODING_SCHEME)
            # the private triage concept, or the private prior-interval concept, is used
            if result.structured is not None or _says_interval(result)
            else (codes.IHE_CODING_SCHEME,)
        )
    ]

    first = _first_evidence_for_highdicom(evidence[0])
    # The prior's images (another study): highdicom files them under Pertinent Other Evidence.
    others = prior_evidence(result, str(first.StudyInstanceUID))
    sr = Comprehensive3DSR(
        evidence=[first, *evidence[1:], *others],
        content=content[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=str(new_uid()),
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        is_complete=result.structured is not None or bool(findings.strip()),
        is_final=False,
        is_verified=False,
        institution_name=node.institution_name,
        institutional_department_name=node.institutional_department_name,
        contributing_equipment=[equipment],
        series_description=series_description(model.is_test_model, bool(result.not_analysed)),
        manufacturer_model_name=node.manufacturer_model_name,
        software_versions=node.software_version,
        device_serial_number=node.device_serial_number,
        content_date=when.date(),
        content_time=when.time().replace(tzinfo=None),
        series_date=when.date(),
        series_time=when.time().replace(tzinfo=None),
        coding_schemes=coding_schemes,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=character_set,
    )
    sr.StationName = node.effective_station_name
    if node.device_uid:
        sr.DeviceUID = node.device_uid
    sr.TimezoneOffsetFromUTC = _utc_offset(when)
    sr.file_meta.ImplementationClassUID = implementation_class_uid()
    sr.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    logger.info(
        "built SR %s in series %s (%d source instances, %d prior instances, completion %s)",
        sr.SOPInstanceUID,
        series_uid,
        len(sources),
        len(others),
        sr.CompletionFlag,
    )
    return sr
