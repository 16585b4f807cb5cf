"""Content of the AI findings SR built from real source headers (no external tools needed)."""

from __future__ import annotations

import copy
import datetime
import io
import logging

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from scp_node.engine.result import SourceImageRef
from scp_node.report import ReportingNode, build_measurement_report, codes
from scp_node.report.text import (
    EMPTY_FINDINGS_PLACEHOLDER,
    REVIEW_STATEMENT,
    TEST_MODEL_STATEMENT,
)
from scp_node.report.uids import model_device_uid

PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _group(sr: hd.sr.Comprehensive3DSR):
    if not isinstance(sr.content, hd.sr.MeasurementReport):
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _texts(sr: hd.sr.Comprehensive3DSR, name) -> list[str]:
    items = find_content_items(_group(sr)[0], name=name, value_type=ValueTypeValues.TEXT)
    return [item.value for item in items]


def _reparse(sr: hd.sr.Comprehensive3DSR) -> hd.sr.Comprehensive3DSR:
    """Write to memory and parse back with highdicom, as a receiver would.

    Only a parsed SR exposes its content as ``MeasurementReport`` (a freshly built one holds a
    plain ``ContentSequence``), so tree checks run on what a receiver would see.
    """
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


@pytest.fixture(scope="module")
def cxr_sr(cxr_rg1, make_result, node):
    result = make_result(cxr_rg1, test_model=True)
    return _reparse(build_measurement_report(cxr_rg1, result, node=node)), result


@pytest.fixture(scope="module")
def ct_sr(ct_report):
    sr, result = ct_report
    return _reparse(sr), result


def test_patient_and_study_equal_source(cxr_sr, cxr_rg1):
    sr, _ = cxr_sr
    source = cxr_rg1[0]
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sr.get(keyword) == source.get(keyword), keyword


def test_new_series_and_document_flags(cxr_sr, cxr_rg1):
    sr, _ = cxr_sr
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.SeriesInstanceUID != cxr_rg1[0].SeriesInstanceUID
    assert sr.SOPInstanceUID != cxr_rg1[0].SOPInstanceUID
    assert sr.SeriesNumber == 9901 and sr.InstanceNumber == 1
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.Manufacturer == "scp_node" and sr.InstitutionName == "scp_node"
    assert sr.StationName == "SCPNODE-01"
    assert sr.DeviceSerialNumber == "SN-0001"


def test_series_description_labels(cxr_sr, ct_sr):
    test_sr, _ = cxr_sr
    prod_sr, _ = ct_sr
    assert "TEST MODEL" in test_sr.SeriesDescription
    assert "UNVERIFIED" in test_sr.SeriesDescription
    assert "TEST MODEL" not in prod_sr.SeriesDescription
    assert prod_sr.SeriesDescription.startswith("AI findings (MedGemma)")
    assert "not for diagnostic use" in prod_sr.SeriesDescription
    assert len(test_sr.SeriesDescription) <= 64


def test_tid1500_tree(cxr_sr):
    sr, _ = cxr_sr
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    root = report[0]
    assert root.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert root.name == codes.DOCUMENT_TITLE
    procedure = find_content_items(root, name=dcm_codes.DCM.ProcedureReported)
    assert procedure[0].value == codes.procedure_reported("CR")
    group = _group(sr)
    assert group.tracking_identifier == "AI findings (MedGemma)"
    assert group.tracking_uid is not None
    assert group.finding_type == codes.FINDING_TYPE


def _document_comments(sr: hd.sr.Comprehensive3DSR) -> list[str]:
    """Comment TEXT items of the document-level "Qualitative Evaluations" container."""
    (container,) = find_content_items(sr.content[0], name=codes.QUALITATIVE_EVALUATIONS)
    items = find_content_items(container, name=codes.COMMENT, value_type=ValueTypeValues.TEXT)
    return [item.value for item in items]


def test_statements_and_findings_text(cxr_sr, ct_sr):
    sr, result = cxr_sr
    assert _texts(sr, codes.FINDINGS_TEXT) == [result.findings_text]
    comments = _document_comments(sr)
    assert REVIEW_STATEMENT in comments and TEST_MODEL_STATEMENT in comments
    prod, _ = ct_sr
    assert _document_comments(prod) == [REVIEW_STATEMENT]
    # no structured answer and no parse error: no "parsing failed" note in the group
    assert _texts(prod, codes.COMMENT) == []


def test_device_observer_is_the_model(cxr_sr):
    sr, result = cxr_sr
    observers = sr.content.get_observer_contexts(observer_type=codes.DEVICE_OBSERVER)
    assert len(observers) == 1
    attributes = observers[0].observer_identifying_attributes
    assert attributes.uid == model_device_uid(result.model)
    assert attributes.name == result.model.name
    assert attributes.manufacturer_name == "scp_node"
    assert not sr.content.get_observer_contexts(observer_type=dcm_codes.DCM.Person)


def test_algorithm_identification(cxr_sr):
    sr, result = cxr_sr
    root = _group(sr)[0]

    def values(code):
        return [i.value for i in find_content_items(root, name=code)]

    assert values(dcm_codes.DCM.AlgorithmName) == [result.model.name]
    assert values(dcm_codes.DCM.AlgorithmVersion) == [result.model.version]
    parameters = values(dcm_codes.DCM.AlgorithmParameters)
    assert f"weights_sha256={result.model.weights_sha256}" in parameters
    assert f"prompt_profile={result.prompt_profile}" in parameters
    assert "test_model=true" in parameters


def test_contributing_equipment_names_model_and_node(cxr_sr, cxr_rg1):
    sr, result = cxr_sr
    items = {
        item.PurposeOfReferenceCodeSequence[0].CodeMeaning: item
        for item in sr.ContributingEquipmentSequence
    }
    algorithm = items["Processing Algorithm"]
    purpose = algorithm.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")
    assert algorithm.Manufacturer == "scp_node"
    assert algorithm.ManufacturerModelName == result.model.name
    assert algorithm.DeviceUID == model_device_uid(result.model)
    assert result.model.version in algorithm.SoftwareVersions
    assert "SCPNODE" in algorithm.ContributionDescription
    assert result.model.weights_sha256 in algorithm.ContributionDescription
    # highdicom adds the source's acquisition equipment and itself
    assert "Acquisition Equipment" in items
    assert items["Acquisition Equipment"].Manufacturer == cxr_rg1[0].Manufacturer
    # the private coding scheme is identified
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert "99IHE" in schemes


def test_device_uid_follows_weights(tiny_model, medgemma_model):
    import dataclasses

    assert model_device_uid(tiny_model) == model_device_uid(dataclasses.replace(tiny_model))
    upper = dataclasses.replace(tiny_model, weights_sha256=tiny_model.weights_sha256.upper())
    assert model_device_uid(upper) == model_device_uid(tiny_model)
    assert model_device_uid(tiny_model) != model_device_uid(medgemma_model)
    assert len(model_device_uid(medgemma_model)) <= 64


def test_references_to_all_ct_sources(ct_sr, ct_series):
    sr, result = ct_sr
    source_uids = {ref.sop_instance_uid for ref in result.sources}
    assert len(source_uids) == 133
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in ct_series}
    series = sr.get_evidence_series()
    assert series == [(ct_series[0].StudyInstanceUID, ct_series[0].SeriesInstanceUID)]
    group_refs = {img.referenced_sop_instance_uid for img in _group(sr).source_images}
    assert group_refs == source_uids
    library = find_content_items(
        sr.content[0], name=dcm_codes.DCM.ImageLibrary, value_type=ValueTypeValues.CONTAINER
    )[0]
    library_images = find_content_items(library, value_type=ValueTypeValues.IMAGE, recursive=True)
    assert {i.referenced_sop_instance_uid for i in library_images} == source_uids
    assert codes.procedure_reported("CT") == dcm_codes.cid100.CTUnspecifiedBodyRegion


def test_subset_of_sources_and_frames(ct_series, make_result, node):
    picked = ct_series[10:13]
    sources = [SourceImageRef(ds.SOPClassUID, ds.SOPInstanceUID) for ds in picked]
    sources.append(SourceImageRef(picked[0].SOPClassUID, picked[0].SOPInstanceUID, frame_number=1))
    sr = build_measurement_report(ct_series, make_result(ct_series, sources=sources), node=node)
    refs = _group(sr).source_images
    assert [r.referenced_sop_instance_uid for r in refs] == [ds.SOPInstanceUID for ds in picked]
    assert refs[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 1
    assert len(sr.get_evidence()) == 133  # the evidence still lists the whole series


def test_non_ascii_text_switches_to_utf8(cxr_rg1, make_result, node):
    text = "Herzgröße normal, kein Pneumothorax. 心脏大小正常，未见气胸。"
    sr = build_measurement_report(cxr_rg1, make_result(cxr_rg1, text), node=node)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    back = _reparse(sr)
    assert _texts(back, codes.FINDINGS_TEXT) == [text]
    assert back.PatientName == cxr_rg1[0].PatientName


def test_ascii_text_keeps_source_character_set(cxr_rg1, cxr_mono1, make_result, node):
    sr = build_measurement_report(cxr_rg1, make_result(cxr_rg1), node=node)
    assert sr.SpecificCharacterSet == cxr_rg1[0].SpecificCharacterSet == "ISO_IR 100"
    sr = build_measurement_report(cxr_mono1, make_result(cxr_mono1), node=node)
    assert "SpecificCharacterSet" not in sr


def test_latin1_patient_name_survives_utf8_report(cxr_rg1, make_result, node):
    source = copy.deepcopy(cxr_rg1[0])
    source.PatientName = "Müller^Jörg"
    buffer = io.BytesIO()
    source.save_as(buffer)
    buffer.seek(0)
    latin1 = pydicom.dcmread(buffer)
    assert latin1.SpecificCharacterSet == "ISO_IR 100"
    sr = build_measurement_report([latin1], make_result([latin1], "右肺上叶结节"), node=node)
    back = _reparse(sr)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^Jörg"


def test_long_text_round_trips(cxr_rg1, make_result, node):
    line = "The lungs are clear; no effusion, no pneumothorax."
    text = "\r\n".join(f"{i}. {line}" for i in range(3000))
    assert len(text) > 150_000
    back = _reparse(build_measurement_report(cxr_rg1, make_result(cxr_rg1, text), node=node))
    assert _texts(back, codes.FINDINGS_TEXT) == [text]


def test_empty_findings_get_placeholder_and_partial(cxr_rg1, make_result, node):
    for empty in ("", "   \n"):
        sr = build_measurement_report(cxr_rg1, make_result(cxr_rg1, empty), node=node)
        assert _texts(sr, codes.FINDINGS_TEXT) == [EMPTY_FINDINGS_PLACEHOLDER]
        assert sr.CompletionFlag == "PARTIAL"


def test_control_characters_are_removed(cxr_rg1, make_result, node):
    sr = build_measurement_report(cxr_rg1, make_result(cxr_rg1, "a\x00b\x1bc\td\r\ne"), node=node)
    assert _texts(_reparse(sr), codes.FINDINGS_TEXT) == ["a b c\td\r\ne"]


def test_missing_type2_study_id_is_written_empty(cxr_mono1, make_result, node):
    assert "StudyID" not in cxr_mono1[0]
    back = _reparse(build_measurement_report(cxr_mono1, make_result(cxr_mono1), node=node))
    assert "StudyID" in back and not back.StudyID
    assert "PatientID" not in cxr_mono1[0] and back.PatientID == ""  # Type 2: present, empty
    assert "StudyID" not in cxr_mono1[0]  # the caller's header is not modified


def test_invalid_patient_sex_is_written_empty(cxr_rg1, make_result, node):
    source = copy.deepcopy(cxr_rg1[0])
    source.PatientSex = "W"  # not M/F/O: highdicom would raise on it
    back = _reparse(build_measurement_report([source], make_result([source]), node=node))
    assert back.PatientSex == ""
    assert back.PatientID == source.PatientID


def test_caller_choices_are_used(cxr_rg1, make_result, node):
    series_uid = hd.UID()
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=plus_one)
    sr = build_measurement_report(
        cxr_rg1,
        make_result(cxr_rg1),
        node=node,
        series_instance_uid=series_uid,
        series_number=9902,
        instance_number=3,
        content_datetime=when,
    )
    assert sr.SeriesInstanceUID == series_uid
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9902, 3)
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20250102", "030405")
    assert sr.TimezoneOffsetFromUTC == "+0100"


def test_rejects_bad_input(cxr_rg1, cxr_mono1, ct_series, make_result, node):
    result = make_result(cxr_rg1)
    with pytest.raises(ValueError, match="no evidence"):
        build_measurement_report([], result, node=node)
    with pytest.raises(ValueError, match="new series"):
        build_measurement_report(
            cxr_rg1, result, node=node, series_instance_uid=cxr_rg1[0].SeriesInstanceUID
        )
    with pytest.raises(ValueError, match="more than one study"):
        build_measurement_report([*cxr_rg1, *cxr_mono1], result, node=node)
    with pytest.raises(ValueError, match="not among the evidence"):
        build_measurement_report(ct_series, result, node=node)


def test_node_rejects_values_that_break_vrs():
    with pytest.raises(ValueError):
        ReportingNode(ae_title="A" * 17)
    with pytest.raises(ValueError):
        ReportingNode(ae_title="SCPNODE", station_name="S" * 17)
    with pytest.raises(ValueError):
        ReportingNode(ae_title="")


def test_patient_identifiers_are_not_logged(cxr_rg1, make_result, node, caplog):
    with caplog.at_level(logging.DEBUG, logger="scp_node"):
        build_measurement_report(cxr_rg1, make_result(cxr_rg1), node=node)
    assert caplog.records, "expected at least one log record from the report builder"
    source = cxr_rg1[0]
    for value in (str(source.PatientName), str(source.PatientID), str(source.AccessionNumber)):
        assert value and value not in caplog.text
