"""A Chinese SR survives the PACS: sent to Orthanc over REST and read back byte-equal in its text."""

from __future__ import annotations

import io

import pydicom
import pytest

from scp_node.engine.result import Finding, StructuredFindings
from scp_node.report import build_measurement_report, write_report
from tests.support.orthanc import start_orthanc

pytestmark = pytest.mark.integration


def _encoded_texts(ds: pydicom.Dataset) -> list[bytes]:
    """Raw bytes of every TEXT value as stored (no decoding), in tree order."""
    values: list[bytes] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            raw = item.get_item(0x0040A160)  # Text Value, undecoded when read from a file
            assert isinstance(raw, pydicom.dataelem.RawDataElement)
            values.append(bytes(raw.value))
        values.extend(_encoded_texts(item))
    return values


def test_chinese_sr_round_trip_through_orthanc(cxr_rg1, make_result, node, tmp_path):
    result = make_result(cxr_rg1, "{}", test_model=True)
    result.language = "zh"
    result.structured = StructuredFindings(
        findings=(Finding("consolidation", "右肺下叶实变，伴空气支气管征。", "右肺下叶", 30.0),),
        impression="右肺下叶肺炎可能。", recommendation="抗感染治疗后复查。", triage="abnormal",
    )
    path = write_report(build_measurement_report(cxr_rg1, result, node=node), tmp_path / "zh.dcm")
    sent = pydicom.dcmread(path)
    orthanc = start_orthanc(tmp_path / "orthanc", {})
    try:
        instance = orthanc.upload(path)["ID"]
        returned = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance}/file")))
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
    finally:
        orthanc.stop()
    assert returned.SpecificCharacterSet == "ISO_IR 192"
    assert returned.SOPInstanceUID == sent.SOPInstanceUID
    sent_texts, returned_texts = _encoded_texts(sent), _encoded_texts(returned)
    assert returned_texts == sent_texts
    assert "右肺下叶肺炎可能。".encode("utf-8") in [t.rstrip(b" ") for t in returned_texts]
    assert tags["SeriesDescription"] == sent.SeriesDescription
