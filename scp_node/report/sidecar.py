"""JSON sidecar next to each SR: the findings in a form scripts and dashboards can read.

Why no patient identifiers: the sidecar is meant for logs, metrics and debugging, where files
travel further than the DICOM store. It keys the exam by UIDs only (study, series, SR), which
identify the data in the PACS but carry no name, ID, birth date or accession number.
"""

from __future__ import annotations

from typing import Any

from highdicom.sr import Comprehensive3DSR

from scp_node.engine.result import AnalysisResult, Finding, StructuredFindings
from scp_node.report import codes
from scp_node.report.comparison import prior_images, report_comparison, sentence
from scp_node.report.content import report_language
from scp_node.report.uids import model_device_uid

#: Version of the sidecar layout; bump when keys change meaning (2: structured findings). Keys
#: added since ("comparison", each finding's "change"/"change_code") keep the old keys' meaning.
SIDECAR_SCHEMA = "scp_node.findings/2"


def _code(code) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


def _region(finding: Finding, result: AnalysisResult) -> dict[str, Any] | None:
    """The box in source pixels (as in the SR's SCOORD) and on the model grid, with its image."""
    region = finding.region
    if region is None:
        return None
    source = (
        result.sources[region.source_index]
        if 0 <= region.source_index < len(result.sources)
        else None
    )
    return {
        "sop_instance_uid": str(source.sop_instance_uid) if source else None,
        "frame_number": source.frame_number if source else None,
        "row0": region.row0,
        "col0": region.col0,
        "row1": region.row1,
        "col1": region.col1,
        "box_2d": list(region.box_2d),
    }


def _slice(finding: Finding, result: AnalysisResult) -> dict[str, Any] | None:
    """CT/MR: the image the model named (its SLICE k, 1-based in the model input) and its instance."""
    index = finding.source_index
    if index is None or not 0 <= index < len(result.sources):
        return None
    source = result.sources[index]
    return {"slice": index + 1, "sop_instance_uid": str(source.sop_instance_uid),
            "frame_number": source.frame_number}


def _finding(finding: Finding, result: AnalysisResult) -> dict[str, Any]:
    site = codes.finding_site(finding.location) if finding.location.strip() else None
    return {
        "finding_type": finding.finding_type,
        "code": _code(codes.finding_type_code(finding.finding_type)),
        "description": finding.description,
        "location": finding.location,
        "finding_site": (
            {"code": _code(site[0]), "laterality": _code(site[1]) if site[1] else None}
            if site
            else None
        ),
        "measurements": (
            [{"name": _code(codes.SIZE), "value": finding.size_mm, "unit": "mm"}]
            if finding.size_mm is not None
            else []
        ),
        "region": _region(finding, result),
        "slice": _slice(finding, result),
        **_change(finding, result),
    }


def _change(finding: Finding, result: AnalysisResult) -> dict[str, Any]:
    """The finding's change since the prior, as the SR codes it (None where the SR has none)."""
    comparison = report_comparison(result)
    code = codes.change_code(finding.change)
    if comparison is None or comparison.status != "compared" or code is None:
        return {"change": None, "change_code": None}
    return {"change": finding.change.strip().lower(), "change_code": _code(code)}


def _comparison(result: AnalysisResult) -> dict[str, Any] | None:
    """What the SR says about the prior study; None when priors were not looked up."""
    comparison = report_comparison(result)
    if comparison is None:
        return None
    return {
        "status": comparison.status,
        "reason": comparison.reason or None,
        "sentence": sentence(result, report_language(result)),
        "prior_study_instance_uid": comparison.prior_study_instance_uid or None,
        "prior_series_instance_uid": comparison.prior_series_instance_uid or None,
        "prior_study_date": comparison.prior_study_date or None,
        "interval_days": comparison.interval_days,
        "source": comparison.source or None,
        "prior_images": list(prior_images(comparison)) if comparison.status == "compared" else [],
    }


def _structured(structured: StructuredFindings | None, result: AnalysisResult) -> dict[str, Any]:
    if structured is None:
        return {"findings": None, "impression": None, "recommendation": None,
                "triage": None, "image_quality": None}
    return {
        "findings": [_finding(f, result) for f in structured.findings],
        "impression": structured.impression,
        "recommendation": structured.recommendation,
        "triage": structured.triage,
        "triage_code": _code(codes.TRIAGE_VALUES[structured.triage])
        if structured.triage in codes.TRIAGE_VALUES
        else None,
        "image_quality": structured.image_quality,
    }


def _source_series(sr: Comprehensive3DSR) -> list[str]:
    """Series UIDs of the evidence, read from the SR itself so sidecar and SR cannot disagree."""
    series: list[str] = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for item in study.get("ReferencedSeriesSequence", []):
            uid = str(item.SeriesInstanceUID)
            if uid not in series:
                series.append(uid)
    return series


def _content_datetime(sr: Comprehensive3DSR) -> str:
    """ISO 8601 content date/time of the SR, with its UTC offset when the SR states one."""
    date = str(sr.ContentDate)
    time = str(sr.ContentTime)
    text = f"{date[0:4]}-{date[4:6]}-{date[6:8]}T{time[0:2]}:{time[2:4]}:{time[4:6]}"
    offset = str(sr.get("TimezoneOffsetFromUTC", "") or "")
    if len(offset) == 5:
        text += f"{offset[0:3]}:{offset[3:5]}"
    return text


def findings_json(sr: Comprehensive3DSR, result: AnalysisResult) -> dict[str, Any]:
    """JSON-serialisable summary of one SR and the result it carries (no patient identifiers)."""
    series = _source_series(sr)
    model = result.model
    return {
        "schema": SIDECAR_SCHEMA,
        "exam": {
            "study_instance_uid": str(sr.StudyInstanceUID),
            "series_instance_uid": series[0] if len(series) == 1 else series,
            "modality": result.modality,
            # the series' own instances: the prior's (Pertinent Other Evidence) are in "comparison"
            "source_instance_count": len(sr.get_evidence(current_procedure_only=True)),
        },
        "model": {
            "name": model.name,
            "version": model.version,
            "weights_sha256": model.weights_sha256.strip().lower(),
            "is_test_model": model.is_test_model,
            "device": model.device,
            "dtype": model.dtype,
            "device_uid": str(model_device_uid(model)),
            "prompt_profile": result.prompt_profile,
        },
        "language": result.language,
        "structured": result.structured is not None,
        "parse_error": result.parse_error or None,
        **_structured(result.structured, result),
        "findings_text": result.findings_text,
        "generated_tokens": result.generated_tokens,
        "seconds": result.seconds,
        "answer_mode": getattr(result, "answer_mode", ""),
        "not_analysed": getattr(result, "not_analysed", "") or None,
        "comparison": _comparison(result),
        "turns": [{"name": t.name, "input_tokens": t.input_tokens, "new_tokens": t.new_tokens,
                   "seconds": round(t.seconds, 3)} for t in getattr(result, "turns", [])],
        "sr": {
            "sop_instance_uid": str(sr.SOPInstanceUID),
            "sop_class_uid": str(sr.SOPClassUID),
            "series_instance_uid": str(sr.SeriesInstanceUID),
            "completion_flag": str(sr.CompletionFlag),
            "verification_flag": str(sr.VerificationFlag),
            "content_datetime": _content_datetime(sr),
        },
    }
