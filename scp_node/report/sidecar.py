"""JSON sidecar next to each SR: the findings in a form scripts and dashboards can read.

Why no patient identifiers: the sidecar is meant for logs, metrics and debugging, where files
travel further than the DICOM store. It keys the exam by UIDs only (study, series, SR), which
identify the data in the PACS but carry no name, ID, birth date or accession number.
"""

from __future__ import annotations

from typing import Any

from highdicom.sr import Comprehensive3DSR

from scp_node.engine.result import AnalysisResult
from scp_node.report.uids import model_device_uid

#: Version of the sidecar layout; bump when keys change meaning.
SIDECAR_SCHEMA = "scp_node.findings/1"


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
            "source_instance_count": len(sr.get_evidence()),
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
        "findings_text": result.findings_text,
        "generated_tokens": result.generated_tokens,
        "seconds": result.seconds,
        "sr": {
            "sop_instance_uid": str(sr.SOPInstanceUID),
            "sop_class_uid": str(sr.SOPClassUID),
            "series_instance_uid": str(sr.SeriesInstanceUID),
            "completion_flag": str(sr.CompletionFlag),
            "verification_flag": str(sr.VerificationFlag),
            "content_datetime": _content_datetime(sr),
        },
    }
