"""findings_json: the JSON sidecar carries UIDs, model identity and text, no patient identifiers."""

from __future__ import annotations

import json

from scp_node.report import build_measurement_report, findings_json
from scp_node.report.uids import model_device_uid


def test_sidecar_content(cxr_rg1, make_result, node):
    result = make_result(cxr_rg1, "Keine Auffälligkeiten.", test_model=True)
    sr = build_measurement_report(cxr_rg1, result, node=node)
    sidecar = findings_json(sr, result)
    text = json.dumps(sidecar, ensure_ascii=False)  # must be JSON-serialisable as is

    source = cxr_rg1[0]
    assert sidecar["exam"] == {
        "study_instance_uid": source.StudyInstanceUID,
        "series_instance_uid": source.SeriesInstanceUID,
        "modality": "CR",
        "source_instance_count": 1,
    }
    assert sidecar["model"]["name"] == result.model.name
    assert sidecar["model"]["weights_sha256"] == result.model.weights_sha256
    assert sidecar["model"]["is_test_model"] is True
    assert sidecar["model"]["device_uid"] == model_device_uid(result.model)
    assert sidecar["model"]["prompt_profile"] == result.prompt_profile
    assert sidecar["findings_text"] == "Keine Auffälligkeiten."
    assert sidecar["sr"]["sop_instance_uid"] == sr.SOPInstanceUID
    assert sidecar["sr"]["series_instance_uid"] == sr.SeriesInstanceUID
    assert sidecar["sr"]["verification_flag"] == "UNVERIFIED"
    date = str(sr.ContentDate)
    assert sidecar["sr"]["content_datetime"].startswith(f"{date[:4]}-{date[4:6]}-{date[6:8]}T")

    for identifier in (
        str(source.PatientName),
        str(source.PatientID),
        str(source.AccessionNumber),
        str(source.PatientBirthDate),
    ):
        assert identifier not in text


def test_sidecar_for_ct_series(ct_series, ct_report):
    sr, result = ct_report
    sidecar = findings_json(sr, result)
    assert sidecar["exam"]["series_instance_uid"] == ct_series[0].SeriesInstanceUID
    assert sidecar["exam"]["source_instance_count"] == 133
    assert sidecar["exam"]["modality"] == "CT"
    assert sidecar["sr"]["completion_flag"] == "COMPLETE"
    assert sidecar["model"]["is_test_model"] is False


def test_sidecar_for_empty_findings(cxr_rg1, make_result, node):
    result = make_result(cxr_rg1, "")
    sidecar = findings_json(build_measurement_report(cxr_rg1, result, node=node), result)
    assert sidecar["sr"]["completion_flag"] == "PARTIAL"
    assert sidecar["findings_text"] == ""
