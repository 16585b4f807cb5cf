"""HL7 ORU^R01 over MLLP: the message (built from a real SR and its sidecar, parsed back strictly
by hl7apy), the exchange with hl7apy's own MLLP server (AA, AE, AR, silence, a wrong ACK), and
the export queue's answer to each: delivered, dead at once, retried with backoff, admin retry."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from scp_node.audit import AuditTrail, Event
from scp_node.config import ConfigError, ExportConfig, HL7Destination, from_mapping
from scp_node.engine.result import (AnalysisResult, Comparison, Finding, ModelIdentity, SourceImageRef,
                                    StructuredFindings)
from scp_node.export.hl7 import (HL7ExportError, build_oru_r01, control_id, parse_ack, read_result,
                                 send_hl7)
from scp_node.node import Node
from scp_node.report import ReportingNode, build_measurement_report
from scp_node.scheduler.analysis import AnalysisQueue
from scp_node.scheduler.completion import SeriesCompletion
from scp_node.scheduler.exports import ExportQueue, retry_dead
from scp_node.store.db import Database
from scp_node.store.models import AuditEvent, ExportJob, ExportState, utcnow
from tests.support.mllp import MLLPListener, ack_for
from tests.store.realdata import CXR_UNCR, ORIGIN, read_bytes
from tests.support.paths import CXR, need_data

MODEL = ModelIdentity(name="scp_node tiny random test model (MedGemma architecture)", version="test-1",
                      weights_sha256="ab" * 32, is_test_model=True)
TRICKY = "Nodule | pipe ^ caret & amp ~ tilde \\ backslash"


def _result(evidence: list[pydicom.Dataset], impression: str = TRICKY) -> AnalysisResult:
    findings = (Finding("nodule", "8 mm nodule", "right upper lobe", 8.0),
                Finding("pleural_effusion", "small effusion", "left"))
    return AnalysisResult(modality=str(evidence[0].Modality), findings_text="Line one.\r\nLine two | with a pipe.",
                          model=MODEL, sources=[SourceImageRef(d.SOPClassUID, d.SOPInstanceUID) for d in evidence],
                          structured=StructuredFindings(findings=findings, impression=impression,
                                                        recommendation="Follow-up CT in 3 months.",
                                                        triage="abnormal"))


def _build(evidence: list[pydicom.Dataset], result: AnalysisResult) -> pydicom.Dataset:
    return build_measurement_report(evidence, result, node=ReportingNode(ae_title="SCPNODE", station_name="S"))


@pytest.fixture
def sr_path(tmp_path: Path) -> Path:
    """A real SR of the CXR and its JSON sidecar, written as the node writes them."""
    evidence = [pydicom.dcmread(need_data(CXR_UNCR), stop_before_pixels=True)]
    result = _result(evidence)
    path = tmp_path / "sr" / "report.dcm"
    Node._write_report(_build(evidence, result), path, result)
    return path


def _dest(port: int, **kw: object) -> HL7Destination:
    return HL7Destination(name="ris", host="127.0.0.1", port=port, sending_facility="RAD",
                          receiving_application="RIS", receiving_facility="HOSP", **kw)  # type: ignore[arg-type]


def _obx(msg) -> list[tuple[str, str, str, str, str]]:  # type: ignore[no-untyped-def]
    """(value type, OBX-3 identifier, OBX-4, OBX-5 as ER7, OBX-11) of every OBX."""
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    return [(o.obx.obx_2.to_er7(), o.obx.obx_3.to_er7().split("^")[0], o.obx.obx_4.to_er7(), o.obx.obx_5.to_er7(),
             o.obx.obx_11.to_er7()) for o in order.oru_r01_observation]


def test_oru_r01_from_a_real_sr(sr_path: Path) -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    src = pydicom.dcmread(CXR_UNCR, stop_before_pixels=True)
    er7 = build_oru_r01(read_result(sr_path), _dest(2575)).to_er7()
    assert "\n" not in er7 and er7.count("\r") >= 3
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert msg.validate()
    msh = msg.msh
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msh.msh_12.to_er7() == "2.5.1"
    assert (msh.msh_3.to_er7(), msh.msh_4.to_er7(), msh.msh_5.to_er7(), msh.msh_6.to_er7()) == \
        ("SCPNODE", "RAD", "RIS", "HOSP")
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    assert msh.msh_10.to_er7() == control_id(sr.SOPInstanceUID, "ris")
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7().split("^")[0] == src.PatientID == "9RG1"
    assert pid.pid_5.to_er7() == "CompressedSamples^RG1"
    assert (pid.pid_7.to_er7(), pid.pid_8.to_er7()) == (src.PatientBirthDate, src.PatientSex)
    obr = msg.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_18.to_er7() == src.AccessionNumber
    assert obr.obr_20.to_er7() == src.StudyInstanceUID
    assert obr.obr_25.to_er7() == "P" and obr.obr_24.to_er7() == "RX"
    assert obr.obr_3.to_er7().split("^")[0] == sr.SOPInstanceUID
    assert obr.obr_7.to_er7() == src.StudyDate + src.StudyTime[:6]
    rows = _obx(msg)
    assert {r[4] for r in rows} == {"P"}  # every observation preliminary
    by_id: dict[str, list[tuple[str, str, str, str, str]]] = {}
    for r in rows:
        by_id.setdefault(r[1], []).append(r)
    assert by_id["110180"][0][3] == src.StudyInstanceUID
    # The impression's HL7 delimiters are escaped by the library and come back intact.
    (imp,) = by_id["121073"]
    assert imp[3] == "Nodule \\F\\ pipe \\S\\ caret \\T\\ amp \\R\\ tilde \\E\\ backslash"
    findings = by_id["121071"]
    assert [(f[0], f[2]) for f in findings] == [("CWE", "1"), ("TX", "1"), ("CWE", "2"), ("TX", "2")]
    assert findings[0][3].endswith("^SCT") and "8 mm nodule" in findings[1][3] and "right upper lobe" in findings[1][3]
    assert by_id["TRIAGE"][0][0] == "CWE" and "Abnormal" in by_id["TRIAGE"][0][3]
    assert [r[3] for r in by_id["121070"]] == ["Line one.", "Line two \\F\\ with a pipe."]
    assert by_id["121075"][0][3] == "Follow-up CT in 3 months."
    comments = [r[3] for r in by_id["121106"]]
    assert any("AI-generated content: must be reviewed by a physician" in c for c in comments)
    assert any(c.startswith("TEST MODEL") for c in comments)
    assert by_id["111001"][0][3] == MODEL.name


def test_comparison_with_the_prior_and_each_change(tmp_path: Path) -> None:
    """A compared prior (another real CXR's study): the sentence, "Comparison with Prior Study Done"
    Yes, and each finding's coded change next to its finding (same OBX-4), parsed back strictly."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    evidence = [pydicom.dcmread(need_data(CXR_UNCR), stop_before_pixels=True)]
    prior = pydicom.dcmread(need_data(CXR / "CR-MONO1-10-chest_barre.dcm"), stop_before_pixels=True)
    result = _result(evidence, impression="Nodule.")
    assert result.structured is not None
    result.structured = StructuredFindings(
        findings=(Finding("nodule", "8 mm nodule", "right upper lobe", 8.0, change="worsened"),
                  Finding("pleural_effusion", "small effusion", "left", change="resolved")),
        impression="Nodule.", triage="abnormal", comparison="Since 1995 | the nodule grew.")
    result.comparison = Comparison(status="compared", prior_study_instance_uid=prior.StudyInstanceUID,
                                   prior_series_instance_uid=prior.SeriesInstanceUID, prior_study_date="19950720",
                                   interval_days=3417, source="local",
                                   prior_sources=[SourceImageRef(prior.SOPClassUID, prior.SOPInstanceUID)])
    path = tmp_path / "compared.dcm"
    Node._write_report(_build(evidence, result), path, result)
    er7 = build_oru_r01(read_result(path), _dest(2575)).to_er7()
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert msg.validate()
    rows = _obx(msg)
    ids = [r[1] for r in rows]
    assert [r[3] for r in rows if r[1] == "122140"] == ["373066001^Yes^SCT"]
    assert [r[3] for r in rows if r[1] == "111424"] == ["Since 1995 \\F\\ the nodule grew."]
    assert ids.index("121073") < ids.index("111424")  # right after the impression
    changes = [(r[0], r[2], r[3]) for r in rows if r[1] == "111049"]
    assert changes == [("CWE", "1", "230993007^Worsening^SCT"), ("CWE", "2", "723506003^Resolved^SCT")]
    texts = [r[3] for r in rows if r[1] == "121071" and r[0] == "TX"]
    assert "change from prior: worsened" in texts[0] and "change from prior: resolved" in texts[1]


@pytest.mark.parametrize(("status", "reason", "sentence"), [
    ("none", "", "No prior study available for comparison."),
    ("unavailable", "source down", "Prior study could not be retrieved: source down."),
])
def test_no_compared_prior_says_so(tmp_path: Path, status: str, reason: str, sentence: str) -> None:
    evidence = [pydicom.dcmread(need_data(CXR_UNCR), stop_before_pixels=True)]
    result = _result(evidence, impression="Nodule.")
    result.comparison = Comparison(status=status, reason=reason)
    path = tmp_path / f"{status}.dcm"
    Node._write_report(_build(evidence, result), path, result)
    rows = _obx(build_oru_r01(read_result(path), _dest(2575)))
    assert [r[3] for r in rows if r[1] == "122140"] == ["373067005^No^SCT"]
    assert [r[3] for r in rows if r[1] == "111424"] == [sentence]
    assert not [r for r in rows if r[1] == "111049"]


def test_without_a_prior_lookup_no_comparison_observations(sr_path: Path) -> None:
    rows = _obx(build_oru_r01(read_result(sr_path), _dest(2575)))
    assert not [r for r in rows if r[1] in ("122140", "111424", "111049")]


def test_zh_and_non_ascii_are_utf8(tmp_path: Path) -> None:
    evidence = [pydicom.dcmread(CXR_UNCR, stop_before_pixels=True)]
    result = _result(evidence, impression="右上叶结节。")
    result.language = "zh"
    path = tmp_path / "zh.dcm"
    Node._write_report(_build(evidence, result), path, result)
    msg = build_oru_r01(read_result(path), _dest(2575))
    assert msg.msh.msh_18.to_er7() == "UNICODE UTF-8"
    er7 = msg.to_er7()
    assert "右上叶结节。" in er7 and "临床使用前必须由医师审核" in er7


def test_aa_from_hl7apy_mllp_server(sr_path: Path) -> None:
    with MLLPListener("AA") as (port, rx):
        assert send_hl7(_dest(port), sr_path, timeout=10) == "AA"
        (msg,) = rx.messages()
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msg.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7() == "P"


@pytest.mark.parametrize("code, acks, dead", [("AE", ("AE",), True), ("AR", ("AE",), False),
                                              ("AR", ("AE", "AR"), True), ("AE", (), False)])
def test_negative_acks(sr_path: Path, code: str, acks: tuple[str, ...], dead: bool) -> None:
    with MLLPListener(code) as (port, rx):
        rx.text = "Unknown patient 9RG1 CompressedSamples"  # a receiver may quote the patient
        with pytest.raises(HL7ExportError) as err:
            send_hl7(_dest(port, dead_letter_acks=acks), sr_path, timeout=10)
    assert err.value.dead_letter is dead and err.value.ack_code == code
    text = str(err.value)
    assert f"ACK {code}" in text and "error 207" in text and "Unknown patient" in text
    assert "9RG1" not in text and "CompressedSamples" not in text  # masked: this text reaches the log


def test_no_ack_is_a_timeout_and_retryable(sr_path: Path) -> None:
    with MLLPListener("silent") as (port, _rx):
        started = time.monotonic()
        with pytest.raises(HL7ExportError) as err:
            send_hl7(_dest(port), sr_path, timeout=1.5)
        assert time.monotonic() - started < 5
    assert "no ACK" in str(err.value) and err.value.dead_letter is False


def test_ack_for_another_message_is_a_failure(sr_path: Path) -> None:
    with MLLPListener("wrong-id") as (port, _rx):
        with pytest.raises(HL7ExportError, match="acknowledged another message") as err:
            send_hl7(_dest(port), sr_path, timeout=10)
    assert err.value.dead_letter is False


def test_refused_connection_and_garbage_answers(sr_path: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HL7ExportError, match="cannot deliver"):
        send_hl7(_dest(port), sr_path, timeout=5)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_garbage() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"\x0bHTTP/1.1 400 Bad Request\r\x1c\r")
        conn.close()

    t = threading.Thread(target=answer_garbage)
    t.start()
    with pytest.raises(HL7ExportError, match="not a parseable HL7 ACK|no MSA-1"):
        send_hl7(_dest(port), sr_path, timeout=5)
    t.join()
    server.close()


def test_parse_ack_enhanced_mode_codes() -> None:
    er7 = ack_for("MSH|^~\\&|A|B|C|D|20260101||ORU^R01^ORU_R01|CTRL1|P|2.5.1\rPID|1", "CE", "bad").to_er7()
    ack = parse_ack(er7.encode())
    assert (ack.code, ack.control_id, ack.error_codes) == ("CE", "CTRL1", ("207",))
    assert "bad" in ack.text


def test_config_hl7_destinations(tmp_path: Path) -> None:
    cfg = from_mapping({"hl7_destinations": [{"name": "ris", "host": "10.0.0.5", "port": 2575,
                                              "receiving_application": "RIS", "dead_letter_acks": ["AE", "AR"],
                                              "modalities": ["ct"], "ack_timeout_seconds": 5}]}, tmp_path, environ={})
    (d,) = cfg.hl7_destinations
    assert (d.name, d.host, d.port, d.kind, d.sending_application, d.dead_letter_acks, d.ack_timeout_seconds) == \
        ("ris", "10.0.0.5", 2575, "hl7", "SCPNODE", ("AE", "AR"), 5.0)
    assert d.wants("CT") and not d.wants("CR")
    bad = [{"name": "x", "host": "h", "port": 0}, {"name": "x", "host": "h", "port": 1, "sending_application": "A|B"},
           {"name": "x", "host": "h", "port": 1, "dead_letter_acks": ["AA"]}, {"host": "h", "port": 1},
           {"name": "x", "host": "h", "port": 1, "colour": "red"}]
    for entry in bad:
        with pytest.raises(ConfigError, match=r"\[\[hl7_destinations\]\]"):
            from_mapping({"hl7_destinations": [entry]}, tmp_path, environ={})
    with pytest.raises(ConfigError, match="unique"):
        from_mapping({"destinations": [{"name": "ris", "ae_title": "PACS", "host": "h", "port": 104}],
                      "hl7_destinations": [{"name": "ris", "host": "h", "port": 2575}]}, tmp_path, environ={})


# -- through the export queue ---------------------------------------------------------------------
class _Engine:
    def analyse_series(self, paths: list[Path]) -> AnalysisResult:
        return _result([pydicom.dcmread(p, stop_before_pixels=True) for p in paths])


POLICY = ExportConfig(max_attempts=3, backoff_initial_seconds=10.0, backoff_multiplier=2.0, backoff_max_seconds=60.0)


def _queued(index_db: Database, audit_trail: AuditTrail, storage_dir: Path, ingestor, dest: HL7Destination) -> None:  # type: ignore[no-untyped-def]
    ingestor.ingest(read_bytes(CXR_UNCR), ORIGIN)
    with index_db.session() as s:
        from scp_node.store.models import Series

        last = s.scalars(select(Series)).one().last_received_at
    SeriesCompletion(index_db, audit_trail, 5, 3600).run_once(now=last + timedelta(seconds=6))
    queue = AnalysisQueue(index_db, audit_trail, storage_dir, _Engine(), _build, Node._write_report, (dest,))
    assert queue.run_once()


def _job(db: Database) -> ExportJob:
    with db.session() as s:
        job = s.scalars(select(ExportJob)).one()
        s.expunge(job)
        return job


def _events(db: Database, name: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event == name).order_by(AuditEvent.id)))


def _due(db: Database) -> None:
    with db.session() as s:
        s.execute(update(ExportJob).values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def _queue(index_db: Database, audit_trail: AuditTrail, storage_dir: Path, dest: HL7Destination) -> ExportQueue:
    def send(d: HL7Destination, path: Path) -> object:
        return send_hl7(d, path, timeout=d.ack_timeout_seconds, index=index_db)
    return ExportQueue(index_db, audit_trail, storage_dir, (dest,), POLICY, send)


def test_queue_ae_is_dead_at_once_then_admin_retry_delivers(index_db: Database, audit_trail: AuditTrail,
                                                            storage_dir: Path, ingestor) -> None:  # type: ignore[no-untyped-def]
    with MLLPListener("AE") as (port, rx):
        dest = _dest(port, ack_timeout_seconds=5.0)
        _queued(index_db, audit_trail, storage_dir, ingestor, dest)
        queue = _queue(index_db, audit_trail, storage_dir, dest)
        assert queue.run_once()
        job = _job(index_db)
        assert (job.state, job.attempts) == (ExportState.DEAD, 1)
        assert "ACK AE" in job.last_error
        (dead,) = _events(index_db, Event.EXPORT_DEAD)
        assert dead.outcome == "failure" and "not retried" in dead.detail and "ACK AE" in dead.detail
        assert dead.peer == f"127.0.0.1:{port}"
        rx.answer = "AA"
        assert retry_dead(index_db, audit_trail, "ris") == 1
        assert queue.run_once()
        job = _job(index_db)
        assert (job.state, job.attempts) == (ExportState.DONE, 1)
        assert len(rx.received) == 2
        msgs = rx.messages()
        # A resend is the same message for the receiver: same control ID.
        assert msgs[0].msh.msh_10.to_er7() == msgs[1].msh.msh_10.to_er7()
    (ok,) = _events(index_db, Event.EXPORT_OK)
    assert "delivered to ris" in ok.detail


def test_queue_ar_and_timeout_are_retried_then_dead(index_db: Database, audit_trail: AuditTrail,
                                                    storage_dir: Path, ingestor) -> None:  # type: ignore[no-untyped-def]
    with MLLPListener("AR") as (port, rx):
        rx.answers = ["AR", "silent"]
        rx.answer = "AR"
        dest = _dest(port, ack_timeout_seconds=1.0)
        _queued(index_db, audit_trail, storage_dir, ingestor, dest)
        queue = _queue(index_db, audit_trail, storage_dir, dest)
        assert queue.run_once()  # AR: retried later
        job = _job(index_db)
        assert job.state == ExportState.PENDING and job.next_attempt_at > utcnow() + timedelta(seconds=5)
        assert queue.run_once() is False  # not due yet
        _due(index_db)
        assert queue.run_once()  # no answer: retried later
        job = _job(index_db)
        assert job.state == ExportState.PENDING and "no ACK" in job.last_error
        _due(index_db)
        rx.stopped.set()
        assert queue.run_once()  # third AR: max_attempts reached
        job = _job(index_db)
        assert (job.state, job.attempts) == (ExportState.DEAD, 3)
    failed = _events(index_db, Event.EXPORT_FAILED)
    assert len(failed) == 2 and "ACK AR" in failed[0].detail and "no ACK" in failed[1].detail
    (dead,) = _events(index_db, Event.EXPORT_DEAD)
    assert "gave up after 3 attempts" in dead.detail


def test_sidecar_missing_still_sends_patient_and_statement(sr_path: Path) -> None:
    sr_path.with_suffix(".json").unlink()
    with MLLPListener("AA") as (port, rx):
        assert send_hl7(_dest(port), sr_path, timeout=10) == "AA"
        (msg,) = rx.messages()
    comments = [r[3] for r in _obx(msg) if r[1] == "121106"]
    assert any("must be reviewed by a physician" in c for c in comments)
    assert msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7().startswith("9RG1")
    json.dumps([r for r in _obx(msg)])


def test_long_texts_go_in_pieces(tmp_path: Path) -> None:
    """A model answer of one 1,500-character line (the test model writes such) and a long impression:
    sent as OBX pieces of at most 199 characters that join back to the text."""
    evidence = [pydicom.dcmread(need_data(CXR_UNCR), stop_before_pixels=True)]
    long_line = "kid" * 500
    words = " ".join(f"word{i}|" for i in range(120))
    result = _result(evidence, impression=words)
    result.findings_text = long_line
    path = tmp_path / "long.dcm"
    Node._write_report(_build(evidence, result), path, result)
    er7 = build_oru_r01(read_result(path), _dest(2575)).to_er7()
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    rows = _obx(parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True))
    text = [r[3] for r in rows if r[1] == "121070"]
    assert len(text) > 1 and all(len(t) <= 199 for t in text) and "".join(text) == long_line
    imp = [r[3] for r in rows if r[1] == "121073"]
    assert len(imp) > 1 and " ".join(imp) == words.replace("|", "\\F\\")


def test_build_failure_is_dead_and_quotes_no_value(sr_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hl7apy.exceptions import MaxLengthReached

    import scp_node.export.hl7 as hl7

    def broken(*_a: object, **_k: object) -> None:
        raise MaxLengthReached("CompressedSamples^RG1 9RG1", 10)

    monkeypatch.setattr(hl7, "build_oru_r01", broken)
    with pytest.raises(HL7ExportError) as err:
        send_hl7(_dest(1), sr_path, timeout=1)
    assert err.value.dead_letter and "9RG1" not in str(err.value) and "MaxLengthReached" in str(err.value)


def test_anonymised_study_without_a_name_gets_hl7_null(tmp_path: Path) -> None:
    """PID-5 is required: a study with no Patient's Name (the LIDC CT) gets HL7's explicit null."""
    ds = pydicom.dcmread(need_data(CXR_UNCR), stop_before_pixels=True)
    ds.PatientName = ""
    result = _result([ds])
    path = tmp_path / "anon.dcm"
    Node._write_report(_build([ds], result), path, result)
    msg = build_oru_r01(read_result(path), _dest(2575))
    assert msg.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7() == '""'
    assert msg.validate()
