"""Structured findings in the SR: coded TID 1501/1410 groups, image regions, language, validators.

Four reports are built once per module from real headers and hand-made structured results (the
engine's parser is another engineer's work; its box mapping, ``region_for`` + ``PadTransform``, is
used as the engine uses it): a padded non-square CXR with boxes, a CT with findings on different
slices, a failed parse, and a Chinese report. Each must pass dciodvfy without errors, show TID 1500
and the coded findings in dsrdump, render in dsr2html, and parse back with highdicom.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from scp_node.engine.answer import region_for
from scp_node.engine.preprocess import PadTransform
from scp_node.engine.result import Finding, ImageRegion, SourceImageRef, StructuredFindings
from scp_node.report import build_measurement_report, findings_json, read_report, write_report
from scp_node.report import codes
from scp_node.report.text import (
    PARSE_FAILED_NOTE,
    REVIEW_STATEMENT,
    REVIEW_STATEMENT_ZH,
    TEST_MODEL_STATEMENT,
    TEST_MODEL_STATEMENT_ZH,
)

from .conftest import ROOT
from .tools import DCIODVFY_EXPECTED_WARNINGS, run_tool

ARTIFACTS = ROOT / "test-artifacts" / "report"

#: Boxes on the model's 0-1000 grid of the zero-padded square ([y0, x0, y1, x1]). RG1_UNCR is
#: 1955 rows x 1841 columns, so the square is 1955 wide with 57 zero columns on the left: the
#: second box starts inside that padding and must be clipped to column 0.
EFFUSION_BOX = (400, 100, 700, 450)
PADDING_BOX = (100, 10, 200, 60)

#: Dicom3tools' 2022 dictionary does not know private coding scheme designators.
EXPECTED_WARNINGS = DCIODVFY_EXPECTED_WARNINGS + ("Unrecognized defined term <99SCPNODE>",)


def expected_source_box(rows: int, columns: int, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    """Hand computation of the box in source pixels: centred zero padding, then clip.

    Written out independently of ``PadTransform`` so that a wrong mapping there shows up here.
    """
    side = max(rows, columns)
    pad_top, pad_left = (side - rows) // 2, (side - columns) // 2
    y0, x0, y1, x1 = box

    def clip(value: float, high: int) -> float:
        return min(max(value, 0.0), float(high))

    return (
        clip(y0 / 1000 * side - pad_top, rows),
        clip(x0 / 1000 * side - pad_left, columns),
        clip(y1 / 1000 * side - pad_top, rows),
        clip(x1 / 1000 * side - pad_left, columns),
    )


def _engine_region(ds: pydicom.Dataset, box: tuple[int, int, int, int]) -> ImageRegion:
    region = region_for(list(box), None, [PadTransform.for_shape(int(ds.Rows), int(ds.Columns))])
    assert region is not None
    return region


@pytest.fixture(scope="module")
def cases(cxr_rg1, cxr_mono1, ct_series, make_result, node, strict_writing_mode, tmp_path_factory):
    """name -> (path, result) for the four reports, written once."""
    out = tmp_path_factory.mktemp("structured")
    built = {}

    rg1 = cxr_rg1[0]
    cxr = make_result(cxr_rg1, '{"findings": [...]}', test_model=False)
    cxr.structured = StructuredFindings(
        findings=(
            Finding("pleural_effusion", "Moderate right pleural effusion with meniscus.",
                    "right lower lobe", 42.0, _engine_region(rg1, EFFUSION_BOX)),
            Finding("nodule", "Small nodule projecting over the left apex.", "left upper lobe",
                    8.5, _engine_region(rg1, PADDING_BOX)),
            Finding("other", "Right-sided central venous catheter, tip in the SVC.",
                    "superior vena cava", None, None),
        ),
        impression="Moderate right pleural effusion. Small left apical nodule.",
        recommendation="Clinical correlation; CT chest for the nodule.",
        image_quality="adequate",
        triage="abnormal",
    )
    built["cxr_boxes"] = (cxr_rg1, cxr)

    slices = {40: "right upper lobe", 80: "left lower lobe", 110: "mediastinum"}
    ct = make_result(ct_series, '{"findings": [...]}', test_model=True)
    ct_findings = []
    for number, (index, location) in enumerate(slices.items()):
        ct_findings.append(Finding(
            ("nodule", "consolidation", "mass")[number], f"Finding on slice index {index}.", location,
            float(6 + number), ImageRegion(index, (0, 0, 0, 0), 200.0 + number, 150.0, 240.0 + number, 190.0),
        ))
    ct_findings.append(Finding("atelectasis", "Bibasal dependent atelectasis.", "both lungs"))
    ct.structured = StructuredFindings(tuple(ct_findings), impression="Three lesions.",
                                       recommendation="Compare with prior CT.", triage="urgent")
    built["ct_multi"] = (ct_series, ct)

    # "report" mode on a CT: the model's own report is the text, the extracted findings name slices
    report = make_result(ct_series, "FINDINGS: 6 mm nodule in the right upper lobe (SLICE 12). Small left "
                         "effusion (SLICE 70).\nIMPRESSION: Pulmonary nodule.", test_model=True)
    report.answer_mode = "report"
    report.structured = StructuredFindings(
        (Finding("nodule", "6 mm nodule.", "right upper lobe", 6.0, source_index=11),
         Finding("pleural_effusion", "Small effusion.", "left pleura", None, source_index=69),
         Finding("other", "Named no slice.", "", None)),
        impression="Pulmonary nodule.", triage="abnormal")
    built["ct_report_slices"] = (ct_series, report)

    failed = make_result(cxr_mono1, "Heart size normal. Lungs clear (not JSON).", test_model=False)
    failed.parse_error = "no JSON object in the answer"
    built["failed_parse"] = (cxr_mono1, failed)

    zh = make_result(cxr_rg1, '{"findings": [...]}', test_model=True)
    zh.language = "zh"
    zh.structured = StructuredFindings(
        findings=(Finding("pneumothorax", "右侧少量气胸。", "右肺", 15.0, _engine_region(rg1, EFFUSION_BOX)),
                  Finding("no_acute_finding", "心影大小正常。", "心脏")),
        impression="右侧少量气胸。", recommendation="建议复查胸片。", image_quality="limited", triage="urgent",
    )
    built["chinese"] = (cxr_rg1, zh)

    files = {}
    with strict_writing_mode():
        for name, (evidence, result) in built.items():
            sr = build_measurement_report(evidence, result, node=node)
            files[name] = (write_report(sr, out / f"{name}.dcm"), result)
    return files


@pytest.mark.parametrize("case", ["cxr_boxes", "ct_multi", "ct_report_slices", "failed_parse", "chinese"])
def test_dciodvfy_has_no_errors(case, cases, require_tool):
    path, _ = cases[case]
    run = run_tool(require_tool("dciodvfy"), str(path))
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert run.returncode == 0 and not errors, "\n".join(errors)
    unexpected = [w for w in lines if w.startswith("Warning") and not any(e in w for e in EXPECTED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("case", ["cxr_boxes", "ct_multi", "ct_report_slices", "failed_parse", "chinese"])
def test_dsrdump_shows_tid1500_and_coded_findings(case, cases, require_tool):
    path, result = cases[case]
    run = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "# TID 1500" in out and "Verification Flag   : UNVERIFIED" in out
    assert '"Qualitative Evaluations"' in out and '"Algorithm Name"' in out
    if result.structured is None:
        assert "# TID 1501" in out and PARSE_FAILED_NOTE in out and result.findings_text in out
        return
    for finding in result.structured.findings:
        code = codes.finding_type_code(finding.finding_type)
        assert f'<contains CODE:(,,"Finding")=({code.value},SCT,"{code.meaning}")>' in out
    triage = codes.TRIAGE_VALUES[result.structured.triage]
    assert f'"AI triage category")=({triage.value},SCT,"{triage.meaning}")' in out
    if any(f.region for f in result.structured.findings):
        assert "# TID 1410" in out and '<contains SCOORD:(,,"Image Region")=(POLYLINE,' in out


def test_cxr_report_content(cases, require_tool):
    path, _ = cases["cxr_boxes"]
    out = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path)).stdout
    assert '"Finding Site")=(90572001,SCT,"Lower lobe of lung")' in out
    assert '"Laterality")=(24028007,SCT,"Right")' in out
    assert '<contains NUM:(,,"Diameter")="42.0" (mm,UCUM,"mm")>' in out
    assert '<contains TEXT:(,,"Finding Site")="superior vena cava">' in out  # not in the table
    assert 'Tracking Identifier")="AI finding 3: Right-sided central venous catheter' in out
    assert '"Impression")="Moderate right pleural effusion. Small left apical nodule."' in out
    assert '"Image Quality")=(RID12,RADLEX,"Diagnostic quality")' in out
    assert REVIEW_STATEMENT in out and TEST_MODEL_STATEMENT not in out


def _scoords(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "SCOORD":
            found.append(item)
        found.extend(_scoords(item))
    return found


def test_scoord_lands_at_the_expected_place_on_the_padded_cxr(cases, cxr_rg1):
    path, _ = cases["cxr_boxes"]
    source = cxr_rg1[0]
    rows, columns = int(source.Rows), int(source.Columns)
    assert rows != columns  # the point: a padded, non-square image
    scoords = _scoords(pydicom.dcmread(path))
    assert len(scoords) == 2
    for scoord, box in zip(scoords, (EFFUSION_BOX, PADDING_BOX)):
        assert scoord.GraphicType == "POLYLINE"
        points = [tuple(scoord.GraphicData[i:i + 2]) for i in range(0, len(scoord.GraphicData), 2)]
        assert len(points) == 5 and points[0] == points[-1]  # closed rectangle
        row0, col0, row1, col1 = expected_source_box(rows, columns, box)
        expected = [(col0, row0), (col1, row0), (col1, row1), (col0, row1), (col0, row0)]
        for (x, y), (ex, ey) in zip(points, expected):  # (x = column, y = row), FL precision
            assert x == pytest.approx(ex, abs=0.01) and y == pytest.approx(ey, abs=0.01)
            assert 0 <= x <= columns and 0 <= y <= rows
        (image,) = scoord.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the padding box starts left of the image: clipped to column 0, 57 padding columns removed
    first_x = scoords[1].GraphicData[0]
    assert first_x == 0.0
    assert scoords[1].GraphicData[2] == pytest.approx(60 / 1000 * rows - (rows - columns) // 2, abs=0.01)


def test_ct_regions_reference_their_slices(cases, ct_series):
    path, result = cases["ct_multi"]
    scoords = _scoords(pydicom.dcmread(path))
    referenced = [s.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in scoords]
    expected = [str(result.sources[f.region.source_index].sop_instance_uid)
                for f in result.structured.findings if f.region]
    assert referenced == expected and len(set(referenced)) == 3
    sr = read_report(path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 3
    assert [g.finding_type for g in groups] == [
        codes.finding_type_code(t) for t in ("nodule", "consolidation", "mass")
    ]
    assert len(sr.content.get_image_measurement_groups()) == 1  # the atelectasis, without region


def test_ct_findings_reference_the_slice_the_model_named(cases, ct_series, require_tool):
    path, result = cases["ct_report_slices"]
    sr = read_report(path)
    assert not sr.content.get_planar_roi_measurement_groups()  # no rectangles on CT
    groups = sr.content.get_image_measurement_groups()
    # the model's report first (free text), then one group per extracted finding
    assert [g.finding_type for g in groups] == [codes.FINDING_TYPE] + [
        codes.finding_type_code(t) for t in ("nodule", "pleural_effusion", "other")]
    referenced = [[str(i.referenced_sop_instance_uid) for i in g.source_images] for g in groups]
    assert referenced[1] == [str(result.sources[11].sop_instance_uid)]
    assert referenced[2] == [str(result.sources[69].sop_instance_uid)]
    assert len(referenced[0]) == len(referenced[3]) == 133  # the report and a finding without a slice: all
    out = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path)).stdout
    assert "6 mm nodule in the right upper lobe (SLICE 12)" in out
    sidecar = findings_json(sr, result)
    slices = [f["slice"] for f in sidecar["findings"]]
    assert slices[0] == {"slice": 12, "sop_instance_uid": str(result.sources[11].sop_instance_uid),
                         "frame_number": None}
    assert slices[2] is None and sidecar["answer_mode"] == "report"


def test_failed_parse_keeps_free_text(cases):
    path, result = cases["failed_parse"]
    sr = read_report(path)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type == codes.FINDING_TYPE
    texts = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
    assert result.findings_text in texts
    assert f"{PARSE_FAILED_NOTE} ({result.parse_error})" in texts
    assert sr.CompletionFlag == "COMPLETE"


def _text_values(ds: pydicom.Dataset) -> list[str]:
    values = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            values.append(item.TextValue)
        values.extend(_text_values(item))
    return values


def test_chinese_report(cases, require_tool):
    path, result = cases["chinese"]
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    language = ds.ContentSequence[0]
    assert language.ConceptNameCodeSequence[0].CodeValue == "121049"
    assert language.ConceptCodeSequence[0].CodeValue == "zh"
    assert language.ConceptCodeSequence[0].CodingSchemeDesignator == "RFC5646"
    texts = _text_values(ds)
    for expected in (REVIEW_STATEMENT_ZH, REVIEW_STATEMENT, TEST_MODEL_STATEMENT_ZH,
                     TEST_MODEL_STATEMENT, "右侧少量气胸。", "建议复查胸片。", "心影大小正常。"):
        assert expected in texts
    out = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path)).stdout
    assert '"Image Quality")=(RID13,RADLEX,"Limited quality")' in out
    assert '"Finding Site")=(39607008,SCT,"Lung")' in out  # 右肺 = lung + right
    assert '"Finding Site")=(80891009,SCT,"Heart")' in out  # 心脏


@pytest.mark.parametrize("case", ["cxr_boxes", "ct_multi", "ct_report_slices", "failed_parse", "chinese"])
def test_dsr2html_renders(case, cases, require_tool):
    path, result = cases[case]
    run = run_tool(require_tool("dsr2html"), str(path))
    assert run.returncode == 0, run.stderr
    html = run.stdout
    assert "Imaging Measurement Report" in html and "AI-generated content" in html
    if case == "chinese":
        assert REVIEW_STATEMENT_ZH in html and "右侧少量气胸。" in html
    if case == "cxr_boxes":
        assert "Pleural effusion" in html and "Polyline" in html
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "cxr_boxes.html").write_text(html, encoding="utf-8")
        shutil.copyfile(path, ARTIFACTS / "cxr_boxes.dcm")


def test_sidecar_has_structured_findings(cases, cxr_rg1):
    path, result = cases["cxr_boxes"]
    sr = read_report(path)
    sidecar = findings_json(sr, result)
    json.dumps(sidecar, ensure_ascii=False)
    assert sidecar["structured"] is True and sidecar["language"] == "en"
    assert sidecar["triage"] == "abnormal" and sidecar["triage_code"]["value"] == "263654008"
    assert sidecar["impression"] == result.structured.impression
    assert sidecar["recommendation"] == result.structured.recommendation
    first = sidecar["findings"][0]
    assert first["code"] == {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"}
    assert first["measurements"] == [
        {"name": {"value": "81827009", "scheme": "SCT", "meaning": "Diameter"}, "value": 42.0, "unit": "mm"}
    ]
    region = first["region"]
    assert region["sop_instance_uid"] == cxr_rg1[0].SOPInstanceUID
    assert region["box_2d"] == list(EFFUSION_BOX)
    row0, col0, row1, col1 = expected_source_box(int(cxr_rg1[0].Rows), int(cxr_rg1[0].Columns), EFFUSION_BOX)
    assert (region["row0"], region["col0"], region["row1"], region["col1"]) == pytest.approx((row0, col0, row1, col1))
    assert sidecar["findings"][2]["region"] is None
    assert sidecar["model"]["name"] == result.model.name
    assert sidecar["sr"]["content_datetime"]
    assert str(cxr_rg1[0].PatientName) not in json.dumps(sidecar, ensure_ascii=False)


def test_sidecar_for_failed_parse(cases):
    path, result = cases["failed_parse"]
    sidecar = findings_json(read_report(path), result)
    assert sidecar["structured"] is False and sidecar["findings"] is None
    assert sidecar["parse_error"] == result.parse_error
    assert sidecar["findings_text"] == result.findings_text


def test_region_outside_the_image_is_dropped(cxr_rg1, make_result, node):
    """A region that does not fit the referenced image is omitted, never written off the image."""
    result = make_result(cxr_rg1, "{}", test_model=False)
    result.structured = StructuredFindings(findings=(
        Finding("mass", "x", "", None, ImageRegion(0, (0, 0, 1, 1), 0.0, 0.0, 99999.0, 10.0)),
    ))
    sr = build_measurement_report(cxr_rg1, result, node=node)
    assert not _scoords(sr)


def test_sources_with_frames_keep_their_frame(cxr_rg1, make_result, node):
    """A region on a source entry references the right instance even when sources repeat."""
    ds = cxr_rg1[0]
    sources = [SourceImageRef(ds.SOPClassUID, ds.SOPInstanceUID)]
    result = dataclasses.replace(make_result(cxr_rg1, "{}", sources=sources))
    result.structured = StructuredFindings(findings=(
        Finding("fracture", "Rib fracture.", "right rib", 20.0, _engine_region(ds, EFFUSION_BOX)),
    ))
    sr = build_measurement_report(cxr_rg1, result, node=node)
    (scoord,) = _scoords(sr)
    assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_structured_answer_without_findings_keeps_the_text_and_validates(
        ct_series, make_result, node, strict_writing_mode, tmp_path, require_tool):
    """The random test model often names no finding: the SR still needs its one TID 1501 group."""
    result = make_result(ct_series, "Impression: nothing specific named by the model.", test_model=True)
    result.structured = StructuredFindings(findings=(), impression="nothing specific", triage="normal")
    with strict_writing_mode():
        sr = build_measurement_report(ct_series, result, node=node)
        path = write_report(sr, tmp_path / "empty.dcm")
    (group,) = read_report(path).content.get_image_measurement_groups()
    assert group.finding_type == codes.FINDING_TYPE
    assert result.findings_text in [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
    v = run_tool(require_tool("dciodvfy"), str(path))
    assert v.returncode == 0 and not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
