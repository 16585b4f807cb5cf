"""write_report: durable, Explicit VR Little Endian, read back before it becomes visible."""

from __future__ import annotations

import stat

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom.uid import ExplicitVRLittleEndian

from scp_node.report import build_measurement_report, codes, read_report, storage, write_report


@pytest.fixture()
def cxr_report(cxr_rg1, make_result, node):
    result = make_result(cxr_rg1, "Kein Erguss. 无胸腔积液。")
    return build_measurement_report(cxr_rg1, result, node=node), result


def test_write_and_read_back(tmp_path, cxr_report):
    sr, result = cxr_report
    target = write_report(sr, tmp_path / "out" / "sr.dcm")
    assert target == tmp_path / "out" / "sr.dcm"
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]  # no temporary left over
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    raw = pydicom.dcmread(target)
    assert raw.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert raw.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert raw.file_meta.ImplementationVersionName == "SCPNODE_010"
    assert raw.preamble is not None  # Part 10 file with preamble and DICM prefix

    back = hd.sr.srread(target)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    assert isinstance(back.content, hd.sr.MeasurementReport)
    group = back.content.get_image_measurement_groups()[0]
    texts = find_content_items(group[0], name=codes.FINDINGS_TEXT, value_type=ValueTypeValues.TEXT)
    assert [t.value for t in texts] == [result.findings_text]
    assert back.ContentSequence == sr.ContentSequence  # the tree round-trips unchanged
    assert read_report(target).SOPInstanceUID == sr.SOPInstanceUID


def test_overwrite_is_atomic(tmp_path, cxr_report, cxr_rg1, make_result, node):
    sr, _ = cxr_report
    target = write_report(sr, tmp_path / "sr.dcm")
    second = build_measurement_report(cxr_rg1, make_result(cxr_rg1), node=node)
    write_report(second, target)
    assert pydicom.dcmread(target).SOPInstanceUID == second.SOPInstanceUID


def test_failed_read_back_leaves_nothing_and_keeps_old_file(tmp_path, cxr_report, monkeypatch):
    sr, _ = cxr_report
    target = write_report(sr, tmp_path / "sr.dcm")
    before = target.read_bytes()

    def broken(path):
        raise ValueError("simulated unparseable file")

    monkeypatch.setattr(storage, "read_report", broken)
    with pytest.raises(ValueError, match="simulated"):
        write_report(sr, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sr.dcm"]


def test_refuses_other_transfer_syntax(tmp_path, cxr_report):
    sr, _ = cxr_report
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="Explicit VR Little Endian"):
        write_report(sr, tmp_path / "sr.dcm")
    assert not list(tmp_path.iterdir())
