"""The prior study in the SR (issue 17): Pertinent Other Evidence, each finding's coded change,
the comparison container, the impression's sentence, and the JSON sidecar.

The current series is the real CXR ``RG1_UNCR.dcm``; the prior's images are taken from another
real CXR of another study (``CR-MONO1-10-chest_barre.dcm``). One SR per comparison status
("compared", "none", "not_comparable", "unavailable") plus the one without a comparison at all
(priors not looked up), each checked with dciodvfy, dsrdump, dsr2html and highdicom's parser.
"""

from __future__ import annotations

import dataclasses
import json

import pydicom
import pytest

from scp_node.engine.answer import region_for
from scp_node.engine.preprocess import PadTransform
from scp_node.engine.result import Comparison, Finding, SourceImageRef, StructuredFindings
from scp_node.report import build_measurement_report, codes, findings_json, read_report, write_report
from scp_node.report.text import (
    NO_PRIOR_SENTENCE,
    NO_PRIOR_SENTENCE_ZH,
    REVIEW_STATEMENT,
    REVIEW_STATEMENT_ZH,
)

from .tools import DCIODVFY_EXPECTED_WARNINGS, run_tool

#: Dicom3tools' 2022 dictionary does not know private coding scheme designators.
EXPECTED_WARNINGS = DCIODVFY_EXPECTED_WARNINGS + ("Unrecognized defined term <99SCPNODE>",)
PRIOR_DATE = "19950720"
MODEL_SENTENCE = "Compared with the prior of 1995-07-20, the right effusion is larger and the nodule is new."
CASES = ["compared", "none", "not_comparable", "unavailable", "not_looked_up", "free_text_none", "chinese_none"]


def _findings(current: pydicom.Dataset, changes: tuple[str, str, str]) -> tuple[Finding, ...]:
    box = region_for([400, 100, 700, 450], None, [PadTransform.for_shape(int(current.Rows), int(current.Columns))])
    return (
        Finding("pleural_effusion", "Moderate right pleural effusion.", "right lower lobe", 42.0, box,
                change=changes[0]),
        Finding("nodule", "Small nodule over the left apex.", "left upper lobe", 8.5, change=changes[1]),
        Finding("cardiomegaly", "Heart size at the upper limit.", "heart", change=changes[2]),
    )


def _compared(prior: pydicom.Dataset) -> Comparison:
    return Comparison(
        status="compared",
        prior_study_instance_uid=str(prior.StudyInstanceUID),
        prior_series_instance_uid=str(prior.SeriesInstanceUID),
        prior_study_date=PRIOR_DATE,
        interval_days=3417,
        source="local",
        prior_sources=[SourceImageRef(prior.SOPClassUID, prior.SOPInstanceUID)],
    )


@pytest.fixture(scope="module")
def cases(cxr_rg1, cxr_mono1, make_result, node, strict_writing_mode, tmp_path_factory):
    """name -> (path, result, sr) for every comparison status, written once."""
    out = tmp_path_factory.mktemp("comparison")
    current, prior = cxr_rg1[0], cxr_mono1[0]
    assert current.StudyInstanceUID != prior.StudyInstanceUID  # the prior is another study

    def structured(changes=("", "", ""), sentence="") -> StructuredFindings:
        return StructuredFindings(findings=_findings(current, changes),
                                  impression="Moderate right pleural effusion.",
                                  recommendation="Follow-up chest X-ray.", triage="abnormal",
                                  comparison=sentence)

    built = {}
    compared = make_result(cxr_rg1, '{"findings": [...]}', test_model=False)
    compared.structured = structured(("worsened", "new", "stable"), MODEL_SENTENCE)
    compared.comparison = _compared(prior)
    built["compared"] = compared

    for status, reason in (("none", ""), ("not_comparable", "different body part (prior is a hand X-ray)"),
                           ("unavailable", "PACS 'archive' did not answer within 30 s")):
        result = make_result(cxr_rg1, '{"findings": [...]}', test_model=True)
        result.structured = structured()
        result.comparison = Comparison(status=status, reason=reason)
        built[status] = result

    not_looked_up = make_result(cxr_rg1, '{"findings": [...]}', test_model=False)
    not_looked_up.structured = structured()
    built["not_looked_up"] = not_looked_up

    free_text = make_result(cxr_rg1, "Lungs clear. No effusion.", test_model=True)
    free_text.comparison = Comparison(status="none")
    built["free_text_none"] = free_text

    zh = make_result(cxr_rg1, '{"findings": [...]}', test_model=True)
    zh.language = "zh"
    zh.structured = StructuredFindings(findings=(Finding("pneumothorax", "右侧少量气胸。", "右肺"),),
                                       impression="右侧少量气胸。", triage="urgent")
    zh.comparison = Comparison(status="none")
    built["chinese_none"] = zh

    files = {}
    with strict_writing_mode():
        for name, result in built.items():
            sr = build_measurement_report(cxr_rg1, result, node=node)
            files[name] = (write_report(sr, out / f"{name}.dcm"), result)
    return files


def _items(ds: pydicom.Dataset, value_type: str | None = None) -> list[pydicom.Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        if value_type is None or item.ValueType == value_type:
            found.append(item)
        found.extend(_items(item, value_type))
    return found


def _named(ds: pydicom.Dataset, code) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeValue == code.value
            and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator]


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_has_no_errors(case, cases, require_tool):
    path, _ = cases[case]
    run = run_tool(require_tool("dciodvfy"), str(path))
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert run.returncode == 0 and not errors, "\n".join(errors)
    unexpected = [w for w in lines if w.startswith("Warning") and not any(e in w for e in EXPECTED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("case", CASES)
def test_dsrdump_and_dsr2html_read_it(case, cases, require_tool):
    path, result = cases[case]
    dump = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path))
    assert dump.returncode == 0, dump.stderr
    assert "# TID 1500" in dump.stdout and "Verification Flag   : UNVERIFIED" in dump.stdout
    html = run_tool(require_tool("dsr2html"), str(path))
    assert html.returncode == 0, html.stderr
    assert "AI-generated content" in html.stdout
    if result.comparison is None:
        assert "Comparison to previous studies" not in dump.stdout
    else:
        assert '<contains CONTAINER:(,,"Comparison to previous studies")=CONTINUOUS>' in dump.stdout
        assert "Comparison to previous studies" in html.stdout
    sr = read_report(path)  # highdicom parses the TID 1500 tree back
    assert sr.content.get_image_measurement_groups() or sr.content.get_planar_roi_measurement_groups()


def test_compared_prior_is_pertinent_other_evidence(cases, cxr_rg1, cxr_mono1):
    path, _ = cases["compared"]
    ds = pydicom.dcmread(path)
    current, prior = cxr_rg1[0], cxr_mono1[0]
    (mine,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert mine.StudyInstanceUID == current.StudyInstanceUID
    assert [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in mine.ReferencedSeriesSequence] == [
        current.SOPInstanceUID]
    (other,) = ds.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == prior.StudyInstanceUID
    (series,) = other.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior.SeriesInstanceUID
    (image,) = series.ReferencedSOPSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (prior.SOPClassUID, prior.SOPInstanceUID)
    assert ds.StudyInstanceUID == current.StudyInstanceUID  # the SR files under the current study
    assert {d.CodingSchemeDesignator for d in ds.CodingSchemeIdentificationSequence} >= {"99SCPNODE"}


@pytest.mark.parametrize("case", ["none", "not_comparable", "unavailable", "not_looked_up"])
def test_no_other_evidence_without_a_compared_prior(case, cases):
    ds = pydicom.dcmread(cases[case][0])
    assert "PertinentOtherEvidenceSequence" not in ds
    assert not _named(ds, codes.CHANGE)


def test_each_finding_carries_its_coded_change(cases, require_tool):
    path, result = cases["compared"]
    sr = read_report(path)
    (roi,) = sr.content.get_planar_roi_measurement_groups()  # the effusion has a box: TID 1410
    others = sr.content.get_image_measurement_groups()  # nodule and cardiomegaly: TID 1501
    groups = [roi, *others]
    for group, finding in zip(groups, result.structured.findings):
        (evaluation,) = group.get_qualitative_evaluations(name=codes.CHANGE)
        assert evaluation.value == codes.CHANGE_VALUES[finding.change]
    out = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path)).stdout
    assert '<contains CODE:(,,"Qualitative Difference")=(230993007,SCT,"Worsening")>' in out
    assert '<contains CODE:(,,"Qualitative Difference")=(7147002,SCT,"New")>' in out
    assert '<contains CODE:(,,"Qualitative Difference")=(58158008,SCT,"Stable")>' in out


def test_comparison_container_names_the_prior(cases, cxr_mono1, require_tool):
    path, _ = cases["compared"]
    prior = cxr_mono1[0]
    out = run_tool(require_tool("dsrdump"), "+Pt", "+Pl", str(path)).stdout
    assert '<contains CODE:(,,"Comparison with Prior Study Done")=(373066001,SCT,"Yes")>' in out
    assert f'<contains UIDREF:(,,"Study Instance UID")="{prior.StudyInstanceUID}">' in out
    assert f'<contains UIDREF:(,,"Series Instance UID")="{prior.SeriesInstanceUID}">' in out
    assert '<contains DATE:(,,"Study Date")="19950720">' in out
    assert '"Interval since prior study")="3417' in out and '(d,UCUM,"day")' in out
    assert f'<contains TEXT:(,,"Comment")="{MODEL_SENTENCE}">' in out
    # the impression ends with the comparison sentence, after the model's own impression
    assert f'"Impression")="Moderate right pleural effusion. {MODEL_SENTENCE}"' in out
    assert REVIEW_STATEMENT in out


@pytest.mark.parametrize(("case", "sentence"), [
    ("none", NO_PRIOR_SENTENCE),
    ("not_comparable", "Prior study not comparable: different body part (prior is a hand X-ray)."),
    ("unavailable", "Prior study could not be retrieved: PACS 'archive' did not answer within 30 s."),
    ("free_text_none", NO_PRIOR_SENTENCE),
])
def test_the_sentence_when_no_prior_was_compared(case, sentence, cases):
    path, result = cases[case]
    ds = pydicom.dcmread(path)
    (done,) = _named(ds, codes.COMPARISON_DONE)
    assert done.ConceptCodeSequence[0].CodeValue == codes.NO.value
    (impression,) = _named(ds, codes.IMPRESSION)
    expected = sentence if result.structured is None else f"{result.structured.impression} {sentence}"
    assert impression.TextValue == expected
    (container,) = _named(ds, codes.COMPARISON)
    texts = [i.TextValue for i in container.ContentSequence if i.ValueType == "TEXT"]
    assert texts == [sentence]
    assert not [i for i in container.ContentSequence if i.ValueType in ("UIDREF", "DATE", "NUM")]
    assert REVIEW_STATEMENT in [i.TextValue for i in _items(ds, "TEXT")]


def test_without_a_lookup_the_sr_says_nothing_about_priors(cases):
    path, result = cases["not_looked_up"]
    ds = pydicom.dcmread(path)
    assert not _named(ds, codes.COMPARISON) and not _named(ds, codes.COMPARISON_DONE)
    (impression,) = _named(ds, codes.IMPRESSION)
    assert impression.TextValue == result.structured.impression
    sidecar = findings_json(read_report(path), result)
    assert sidecar["comparison"] is None
    assert [f["change"] for f in sidecar["findings"]] == [None, None, None]


def test_chinese_report_says_no_prior_in_chinese(cases):
    path, _ = cases["chinese_none"]
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    (impression,) = _named(ds, codes.IMPRESSION)
    assert impression.TextValue == f"右侧少量气胸。{NO_PRIOR_SENTENCE_ZH}"
    assert REVIEW_STATEMENT_ZH in [i.TextValue for i in _items(ds, "TEXT")]


def test_sidecar_carries_the_comparison_and_the_changes(cases, cxr_rg1, cxr_mono1):
    path, result = cases["compared"]
    sidecar = findings_json(read_report(path), result)
    json.dumps(sidecar)
    prior = cxr_mono1[0]
    assert sidecar["comparison"] == {
        "status": "compared", "reason": None, "sentence": MODEL_SENTENCE,
        "prior_study_instance_uid": prior.StudyInstanceUID,
        "prior_series_instance_uid": prior.SeriesInstanceUID,
        "prior_study_date": PRIOR_DATE, "interval_days": 3417, "source": "local",
        "prior_images": [{"sop_class_uid": prior.SOPClassUID, "sop_instance_uid": prior.SOPInstanceUID,
                          "frame_number": None}],
    }
    assert [f["change"] for f in sidecar["findings"]] == ["worsened", "new", "stable"]
    assert sidecar["findings"][0]["change_code"] == {"value": "230993007", "scheme": "SCT", "meaning": "Worsening"}
    # the prior's image is not counted as a source of this series, and the old keys are unchanged
    assert sidecar["exam"]["source_instance_count"] == 1
    assert sidecar["exam"]["series_instance_uid"] == cxr_rg1[0].SeriesInstanceUID
    assert sidecar["impression"] == result.structured.impression
    assert str(prior.PatientName) not in json.dumps(sidecar, ensure_ascii=False)


def test_sidecar_for_unavailable_prior(cases):
    path, result = cases["unavailable"]
    sidecar = findings_json(read_report(path), result)
    assert sidecar["comparison"]["status"] == "unavailable"
    assert sidecar["comparison"]["reason"] == result.comparison.reason
    assert sidecar["comparison"]["sentence"].startswith("Prior study could not be retrieved: ")
    assert sidecar["comparison"]["prior_images"] == []


def test_change_without_a_compared_prior_is_not_written(cxr_rg1, make_result, node):
    """A change claims a comparison; with status "none" it would be a false statement."""
    result = make_result(cxr_rg1, "{}", test_model=False)
    result.structured = StructuredFindings(findings=(Finding("nodule", "x", "", change="new"),
                                                     Finding("mass", "y", "", change="bigger")))
    result.comparison = Comparison(status="none")
    sr = build_measurement_report(cxr_rg1, result, node=node)
    assert not _named(sr, codes.CHANGE)
    result.comparison = dataclasses.replace(result.comparison, status="compared")
    sr = build_measurement_report(cxr_rg1, result, node=node)
    values = [i.ConceptCodeSequence[0].CodeValue for i in _named(sr, codes.CHANGE)]
    assert values == [codes.CHANGE_VALUES["new"].value]  # "bigger" is no change value: left out


def test_prior_claiming_the_current_study_is_not_other_evidence(cxr_rg1, make_result, node):
    current = cxr_rg1[0]
    result = make_result(cxr_rg1, "{}", test_model=False)
    result.comparison = Comparison(status="compared", prior_study_instance_uid=current.StudyInstanceUID,
                                   prior_series_instance_uid="1.2.3.4",
                                   prior_sources=[SourceImageRef(current.SOPClassUID, "1.2.3.4.5")])
    sr = build_measurement_report(cxr_rg1, result, node=node)
    assert "PertinentOtherEvidenceSequence" not in sr
    refs = [s.ReferencedSOPSequence for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence]
    assert [r[0].ReferencedSOPInstanceUID for r in refs] == [current.SOPInstanceUID]


def test_not_analysed_series_says_nothing_about_priors(cxr_rg1, make_result, node):
    result = make_result(cxr_rg1, "", test_model=False)
    result.not_analysed = "image too small"
    result.comparison = Comparison(status="none")
    sr = build_measurement_report(cxr_rg1, result, node=node)
    assert not _named(sr, codes.COMPARISON) and not _named(sr, codes.IMPRESSION)
