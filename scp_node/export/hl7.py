"""HL7 v2.5.1 ORU^R01 to a HIS/RIS over MLLP: the result of each SR, preliminary (status P).

Used by the export queue exactly like the C-STORE and STOW-RS senders: :func:`send_hl7` returns
when the receiver answered AA (or CA) and raises :class:`ExportError` otherwise, and the queue
retries with backoff and keeps a dead letter.  An ACK whose code is in the destination's
``dead_letter_acks`` (AE by default: the receiver refused the content, a resend repeats it) is
dead at once (:attr:`HL7ExportError.dead_letter`); a timeout, a refused connection, AR or an
ACK that is not one is retried.

The message is built with hl7apy (strict validation against the v2.5.1 message structure), so
every value is escaped by the library, never by string concatenation:

- MSH: ``[[hl7_destinations]]`` sending/receiving application and facility, a control ID that
  stays the same on every retry of one export (receivers use it to drop a repeat), UTF-8 when
  any value needs it.
- PID: the study's patient: Patient ID with its issuer, name, birth date, sex (from the SR,
  which carries the evidence's patient module; the issuer from the index when the SR has none).
- OBR: the SR's SOP Instance UID as filler order number, the accession number (OBR-18), the
  Study Instance UID (OBR-20), study date/time, result status P.
- OBX (status P): the Study Instance UID, the impression, the comparison with the prior study
  when priors were looked up (the sentence, and "Comparison with Prior Study Done" Yes/No), each
  finding (coded + text, and its coded change when a prior was compared), triage, recommendation, the model's report text, the
  model's name and version, and the statement that the content is AI-generated and must be
  reviewed by a physician (plus the test-model statement for the test model).

What goes into a log or the audit about an exchange is the ACK's code and text with the
patient's identifiers masked: a receiver may quote them in its error text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import pydicom
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.v2_5_1 import get_base_datatypes

from ..config import HL7Destination
from ..dimse.tls import client_context
from .c_store import ExportError

log = logging.getLogger(__name__)

#: MLLP framing (HL7 v2 Minimal Lower Layer Protocol, release 2): <VT> message <FS><CR>.
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
#: An ACK larger than this is not an ACK.
MAX_ACK_BYTES = 1 << 20

HL7_VERSION = "2.5.1"
_DT = get_base_datatypes()

#: Observation identifiers (OBX-3) and the order code (OBR-4). DCM: DICOM's own terminology
#: (HL7 table 0396 "DCM"); LN: LOINC.
ORDER_CODE = ("18748-4", "Diagnostic imaging study", "LN")
OBS_STUDY_UID = ("110180", "Study Instance UID", "DCM")
OBS_IMPRESSION = ("121073", "Impression", "DCM")
OBS_FINDING = ("121071", "Finding", "DCM")
OBS_FINDINGS_TEXT = ("121070", "Findings", "DCM")
OBS_RECOMMENDATION = ("121075", "Recommendation", "DCM")
OBS_COMMENT = ("121106", "Comment", "DCM")
OBS_ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
OBS_ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
OBS_TRIAGE = ("TRIAGE", "AI triage category", "99SCPNODE")
#: The prior study (issue 17), with the SR's concepts (scp_node.report.codes): the sentence, whether
#: a prior was compared (SNOMED CT Yes/No), and each finding's change (OBX-4 = the finding's).
OBS_COMPARISON = ("111424", "Comparison to previous studies", "DCM")
OBS_COMPARISON_DONE = ("122140", "Comparison with Prior Study Done", "DCM")
OBS_CHANGE = ("111049", "Qualitative Difference", "DCM")
_YES = ("373066001", "Yes", "SCT")
_NO = ("373067005", "No", "SCT")

#: HL7 table 0074 Diagnostic Service Section ID by DICOM modality.
_SERVICE_SECTION = {"CT": "CT", "CR": "RX", "DX": "RX", "MR": "NMR", "US": "US", "NM": "NMS", "MG": "RX",
                    "XA": "VUS", "PT": "NMS"}
_HL7_SEX = {"M": "M", "F": "F", "O": "O"}
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class HL7ExportError(ExportError):
    """The receiver did not take the message. ``dead_letter``: retrying cannot help (an ACK code
    the destination lists in ``dead_letter_acks``); the export queue marks it dead at once."""

    def __init__(self, message: str, *, dead_letter: bool = False, ack_code: str = "") -> None:
        super().__init__(message)
        self.dead_letter = dead_letter
        self.ack_code = ack_code


# -- what the message says ------------------------------------------------------------------------
@dataclass
class Patient:
    id: str = ""
    issuer: str = ""
    name: str = ""  #: DICOM PN (family^given^middle^prefix^suffix), alphabetic group only
    birth_date: str = ""  #: YYYYMMDD
    sex: str = ""


@dataclass
class ResultSummary:
    """Everything the ORU^R01 says, read from the SR, its JSON sidecar and the index."""

    patient: Patient
    study_uid: str
    accession_number: str = ""
    study_datetime: str = ""  #: HL7 DTM (YYYYMMDD[HHMMSS])
    modality: str = ""
    sr_sop_uid: str = ""
    content_datetime: str = ""  #: HL7 DTM with offset when known
    impression: str = ""
    recommendation: str = ""
    findings: list[dict[str, Any]] = field(default_factory=list)
    triage: dict[str, str] | None = None  #: {"value", "scheme", "meaning"}
    findings_text: str = ""
    not_analysed: str = ""
    #: The sidecar's "comparison" (status, sentence, prior UIDs...); None: priors not looked up.
    comparison: dict[str, Any] | None = None
    model_name: str = ""
    model_version: str = ""
    is_test_model: bool = False
    language: str = "en"

    def identifiers(self) -> list[str]:
        """Values that identify the patient: masked out of anything we log about an exchange."""
        p = self.patient
        parts = [p.id, p.issuer, p.birth_date, self.accession_number]
        parts += [c for c in re.split(r"[\^=]", p.name) if len(c.strip()) >= 2]
        return [x.strip() for x in parts if x and x.strip()]


def _clean(text: Any) -> str:
    """One line of text: control characters (CR ends a segment) become spaces."""
    return _CONTROLS.sub(" ", str(text or "")).strip()


def _dtm_from_iso(text: str) -> str:
    """'2026-01-02T03:04:05+01:00' -> '20260102030405+0100' (HL7 DTM)."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?([+-]\d\d):?(\d\d)?", text or "")
    if not m:
        return ""
    g = m.groups()
    return "".join(g[:6]) + (f"{g[6]}{g[7] or '00'}" if g[6] else "")


def read_result(sr_path: Path, index_patient: Patient | None = None) -> ResultSummary:
    """The summary of one stored SR: its header (patient, study) and its sidecar (findings)."""
    ds = pydicom.dcmread(sr_path, stop_before_pixels=True)
    name = str(ds.get("PatientName", "") or "").split("=")[0]
    patient = Patient(id=str(ds.get("PatientID", "") or "").strip(),
                      issuer=str(ds.get("IssuerOfPatientID", "") or "").strip(), name=name,
                      birth_date=str(ds.get("PatientBirthDate", "") or "").strip()[:8],
                      sex=str(ds.get("PatientSex", "") or "").strip().upper())
    if index_patient is not None:  # the index keeps the issuer even where the SR has none
        patient.issuer = patient.issuer or index_patient.issuer
        patient.id = patient.id or index_patient.id
    date = re.sub(r"\D", "", str(ds.get("StudyDate", "") or ""))[:8]
    tm = re.sub(r"\D", "", str(ds.get("StudyTime", "") or "").split(".")[0])[:6]
    summary = ResultSummary(patient=patient, study_uid=str(ds.StudyInstanceUID),
                            accession_number=str(ds.get("AccessionNumber", "") or "").strip(),
                            study_datetime=(date + tm) if len(date) == 8 else "",
                            sr_sop_uid=str(ds.SOPInstanceUID))
    try:
        side = json.loads(sr_path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        side = {}
    exam, model = side.get("exam") or {}, side.get("model") or {}
    summary.modality = str(exam.get("modality") or ds.get("Modality", "") or "")
    summary.content_datetime = _dtm_from_iso(str((side.get("sr") or {}).get("content_datetime") or ""))
    summary.impression = str(side.get("impression") or "")
    summary.recommendation = str(side.get("recommendation") or "")
    summary.findings = [f for f in side.get("findings") or [] if isinstance(f, dict)]
    summary.triage = side.get("triage_code") if isinstance(side.get("triage_code"), dict) else None
    summary.findings_text = str(side.get("findings_text") or "")
    summary.not_analysed = str(side.get("not_analysed") or "")
    summary.comparison = side.get("comparison") if isinstance(side.get("comparison"), dict) else None
    summary.model_name = str(model.get("name") or "")
    summary.model_version = str(model.get("version") or "")
    summary.is_test_model = bool(model.get("is_test_model"))
    summary.language = str(side.get("language") or "en")
    return summary


# -- building the message -------------------------------------------------------------------------
def _esc(value: str, datatype: str = "ST") -> str:
    """``value`` as the ER7 text of one component, escaped by hl7apy (| ^ & ~ \\ as \\F\\ \\S\\ ...)."""
    return _DT[datatype](_clean(value)).to_er7() if value else ""


def _coded(code: tuple[str, str, str] | dict[str, str]) -> str:
    """A CE/CWE value: identifier^text^coding system, each component escaped."""
    if isinstance(code, dict):
        code = (code.get("value", ""), code.get("meaning", ""), code.get("scheme", ""))
    return "^".join(_esc(part) for part in code)


def _finding_text(f: dict[str, Any]) -> str:
    words = [str((f.get("code") or {}).get("meaning") or f.get("finding_type") or "Finding")]
    description = _clean(f.get("description"))
    where = _clean(f.get("location"))
    size = [m for m in f.get("measurements") or [] if isinstance(m, dict) and m.get("value") is not None]
    text = words[0] + (f": {description}" if description else "")
    details = [d for d in (where, *(f"{m['value']} {m.get('unit', 'mm')}" for m in size)) if d]
    change = f.get("change") or f.get("change_from_prior")
    if change:
        details.append(f"change from prior: {_clean(change)}")
    return text + (f" ({'; '.join(details)})" if details else "")


def control_id(sr_sop_uid: str, destination: str) -> str:
    """MSH-10: the same for every try of one SR to one destination (a receiver drops repeats by it)."""
    return hashlib.sha256(f"{sr_sop_uid}|{destination}".encode()).hexdigest()[:20]


def build_oru_r01(summary: ResultSummary, dest: HL7Destination, *, now: datetime | None = None) -> Message:
    """The ORU^R01 of one result, validated against HL7 v2.5.1's ORU_R01 structure."""
    from ..report.text import (NOT_ANALYSED_TEXT, REVIEW_STATEMENT, REVIEW_STATEMENT_ZH,
                               TEST_MODEL_STATEMENT)

    now = now or datetime.now().astimezone()
    stamp = now.strftime("%Y%m%d%H%M%S%z")
    msg = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3 = _esc(dest.sending_application, "IS")
    msh.msh_4 = _esc(dest.sending_facility, "IS")
    msh.msh_5 = _esc(dest.receiving_application, "IS")
    msh.msh_6 = _esc(dest.receiving_facility, "IS")
    msh.msh_7 = stamp
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(summary.sr_sop_uid, dest.name)
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_15 = "AL"  # accept acknowledgement: always (enhanced mode receivers)
    msh.msh_16 = "NE"  # application acknowledgement: the MLLP ACK is the answer

    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    p = summary.patient
    pid.pid_1 = "1"
    pid.pid_3 = (_esc(p.id) or '""') + (f"^^^{_esc(p.issuer, 'IS')}" if p.issuer else "")
    names = (p.name.split("^") + [""] * 5)[:5]  # DICOM: family^given^middle^prefix^suffix
    family, given, middle, prefix, suffix = (_clean(n) for n in names)
    if any((family, given, middle, prefix, suffix)):  # XPN: family^given^middle^suffix^prefix
        pid.pid_5 = "^".join([_esc(family), _esc(given), _esc(middle), _esc(suffix), _esc(prefix)]).rstrip("^")
    else:  # required: HL7's explicit null for a study without a patient name (anonymised data)
        pid.pid_5 = '""'
    if re.fullmatch(r"\d{8}", p.birth_date):
        pid.pid_7 = p.birth_date
    if p.sex in _HL7_SEX:
        pid.pid_8 = _HL7_SEX[p.sex]

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3 = f"{_esc(summary.sr_sop_uid)}^{_esc(dest.sending_application, 'IS')}"
    obr.obr_4 = _coded(ORDER_CODE)
    if summary.study_datetime:
        obr.obr_7 = summary.study_datetime
    if summary.accession_number:
        obr.obr_18 = _esc(summary.accession_number)
    obr.obr_20 = _esc(summary.study_uid)
    obr.obr_22 = summary.content_datetime or stamp
    obr.obr_24 = _SERVICE_SECTION.get(summary.modality.upper(), "RAD")
    obr.obr_25 = "P"

    observed = summary.content_datetime or stamp
    n = 0

    def obx(value_type: str, ident: tuple[str, str, str], value: str, sub_id: str = "") -> None:
        """One OBX; ``value`` is ER7 (escaped) for ST and CWE, plain text for TX, which is sent
        in pieces of at most 199 characters (hl7apy holds OBX-5 to that), one OBX each."""
        nonlocal n
        for piece in (_pieces(value) if value_type == "TX" else [value] if value else []):
            n += 1
            seg = order.add_group("ORU_R01_OBSERVATION").obx
            seg.obx_1 = str(n)
            seg.obx_2 = value_type
            seg.obx_3 = _coded(ident)
            if sub_id:
                seg.obx_4 = sub_id
            seg.obx_5 = piece
            seg.obx_11 = "P"
            seg.obx_14 = observed

    obx("ST", OBS_STUDY_UID, _esc(summary.study_uid))
    if summary.not_analysed:
        obx("TX", OBS_COMMENT, NOT_ANALYSED_TEXT.format(reason=_clean(summary.not_analysed)))
    obx("TX", OBS_IMPRESSION, summary.impression)
    if summary.comparison is not None:
        compared = summary.comparison.get("status") == "compared"
        obx("CWE", OBS_COMPARISON_DONE, _coded(_YES if compared else _NO))
        obx("TX", OBS_COMPARISON, str(summary.comparison.get("sentence") or ""))
    for k, f in enumerate(summary.findings, start=1):
        if isinstance(f.get("code"), dict):
            obx("CWE", OBS_FINDING, _coded(f["code"]), sub_id=str(k))
        obx("TX", OBS_FINDING, _finding_text(f), sub_id=str(k))
        if isinstance(f.get("change_code"), dict):
            obx("CWE", OBS_CHANGE, _coded(f["change_code"]), sub_id=str(k))
    if summary.triage:
        obx("CWE", OBS_TRIAGE, _coded(summary.triage))
    obx("TX", OBS_RECOMMENDATION, summary.recommendation)
    for line in _lines(summary.findings_text):  # the model's report, one OBX per line
        obx("TX", OBS_FINDINGS_TEXT, line)
    obx("ST", OBS_ALGORITHM_NAME, _esc(summary.model_name[:150]))
    obx("ST", OBS_ALGORITHM_VERSION, _esc(summary.model_version[:150]))
    if summary.language == "zh":
        obx("TX", OBS_COMMENT, REVIEW_STATEMENT_ZH)
    obx("TX", OBS_COMMENT, REVIEW_STATEMENT)
    if summary.is_test_model:
        obx("TX", OBS_COMMENT, TEST_MODEL_STATEMENT)
    if not msg.to_er7().isascii():
        msh.msh_18 = "UNICODE UTF-8"
    msg.validate()
    return msg


#: hl7apy's strict limit for OBX-5 (it reads a "varies" value as ST); longer text is sent in pieces.
_OBX_MAX = 199


def _pieces(text: str) -> Iterable[str]:
    """``text`` (plain) as escaped pieces of at most 199 characters, cut between words when it can."""
    line = ""
    for word in _clean(text).split(" "):
        while word:
            candidate = f"{line} {word}" if line else word
            if len(_esc(candidate, "TX")) <= _OBX_MAX:
                line, word = candidate, ""
            elif line:
                yield _esc(line, "TX")
                line = ""
            else:  # one word longer than a piece: cut it
                cut = len(word)
                while len(_esc(word[:cut], "TX")) > _OBX_MAX:
                    cut = cut * 3 // 4
                yield _esc(word[:cut], "TX")
                word = word[cut:]
    if line:
        yield _esc(line, "TX")


def _lines(text: str) -> Iterable[str]:
    for line in str(text or "").splitlines():
        if line.strip():
            yield line.rstrip()


# -- MLLP -----------------------------------------------------------------------------------------
def exchange(host: str, port: int, message: bytes, *, timeout: float,
             tls: ssl.SSLContext | None = None) -> bytes:
    """Send one MLLP-framed message and return the framed answer's content."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=min(timeout, 15.0))
    try:
        if tls is not None:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock = tls.wrap_socket(sock, server_hostname=host)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(START_BLOCK + message + END_BLOCK)
        buf = b""
        while not buf.endswith(END_BLOCK):
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no complete ACK within the timeout")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                if buf.endswith(b"\x1c"):  # some receivers close right after <FS>
                    break
                raise ConnectionError("the receiver closed the connection without an ACK"
                                      + (" (incomplete frame)" if buf else ""))
            buf += chunk
            if len(buf) > MAX_ACK_BYTES:
                raise ConnectionError(f"answer larger than {MAX_ACK_BYTES} bytes")
        start = buf.find(START_BLOCK)
        if start < 0:
            raise ConnectionError("the answer is not MLLP-framed")
        return buf[start + 1:].rstrip(b"\r").rstrip(b"\x1c")
    finally:
        try:
            sock.close()
        except OSError:
            pass


@dataclass
class Ack:
    code: str  #: MSA-1: AA, AE, AR (original mode) or CA, CE, CR (enhanced mode)
    control_id: str  #: MSA-2: the MSH-10 of the message it answers
    text: str = ""  #: MSA-3 and the ERR segments' diagnostics
    error_codes: tuple[str, ...] = ()  #: ERR-3 (HL7 table 0357)


def parse_ack(raw: bytes) -> Ack:
    """The MSA (and ERR) of an ACK, read by hl7apy."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        ack = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        msa = ack.msa
        code = msa.msa_1.to_er7().strip().upper()
        ctrl = msa.msa_2.to_er7().strip()
        words = [_unescape(msa.msa_3.to_er7())]
        codes: list[str] = []
        for err in (c for c in ack.children if c.name == "ERR"):
            if err.err_3.to_er7():
                codes.append(_unescape(err.err_3.to_er7().split("^")[0]))
            words += [_unescape(err.err_8.to_er7()), _unescape(err.err_7.to_er7())]
    except (HL7apyException, AttributeError, IndexError, ValueError) as exc:
        raise HL7ExportError(f"the answer is not a parseable HL7 ACK ({type(exc).__name__})") from None
    if not code:
        raise HL7ExportError("the answer has no MSA-1 acknowledgment code")
    return Ack(code=code, control_id=ctrl, text=" ".join(_clean(w) for w in words if w), error_codes=tuple(codes))


_UNESCAPE = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def _unescape(er7: str) -> str:
    """ER7 text of a field as plain text: components joined by spaces, escape sequences decoded."""
    text = re.sub(r"\\([FSTRE])\\", lambda m: "\x00" + m.group(1), er7)
    text = re.sub(r"[\^&~]", " ", text)
    return re.sub(r"\x00([FSTRE])", lambda m: _UNESCAPE[m.group(1)], text).strip()


def _mask(text: str, identifiers: list[str]) -> str:
    for ident in sorted(identifiers, key=len, reverse=True):
        text = re.sub(re.escape(ident), "[patient data]", text, flags=re.IGNORECASE)
    return text[:300]


def send_hl7(dest: HL7Destination, path: Path, *, timeout: float = 60.0, index: Any = None) -> str:
    """Send the ORU^R01 of the SR at ``path`` to ``dest``; return the ACK code (AA or CA).

    ``index``: the node's :class:`~scp_node.store.db.Database`, for the patient's issuer when the
    SR carries none.
    """
    summary = read_result(path, _index_patient(index, path) if index is not None else None)
    try:
        msg = build_oru_r01(summary, dest)
    except HL7apyException as exc:  # deterministic: a resend fails alike. Its text may quote a value.
        raise HL7ExportError(f"the ORU^R01 could not be built ({type(exc).__name__}; value withheld)",
                             dead_letter=True) from None
    sent_id = msg.msh.msh_10.to_er7()
    payload = msg.to_er7().encode("utf-8")
    where = f"{dest.name} ({dest.host}:{dest.port})"
    try:
        raw = exchange(dest.host, dest.port, payload, timeout=timeout, tls=client_context(dest))
    except (socket.timeout, TimeoutError):
        raise HL7ExportError(f"no ACK from {where} within {timeout:.0f} s") from None
    except ssl.SSLError as exc:
        raise HL7ExportError(f"TLS to {where} failed: {exc.reason or type(exc).__name__}") from None
    except OSError as exc:
        raise HL7ExportError(f"cannot deliver to {where}: {exc.strerror or exc}") from None
    ack = parse_ack(raw)
    if ack.control_id and ack.control_id != sent_id:
        raise HL7ExportError(f"{where} acknowledged another message (MSA-2 {ack.control_id[:20]!r}, "
                             f"sent {sent_id})")
    if ack.code in ("AA", "CA"):
        return ack.code
    original = {"CE": "AE", "CR": "AR"}.get(ack.code, ack.code)
    detail = f"{where} answered ACK {ack.code}"
    if ack.error_codes:
        detail += f" (error {', '.join(ack.error_codes)})"
    if ack.text:
        detail += f": {_mask(ack.text, summary.identifiers())}"
    raise HL7ExportError(detail, dead_letter=original in dest.dead_letter_acks, ack_code=ack.code)


def _index_patient(db: Any, sr_path: Path) -> Patient | None:
    """The patient the index holds for the SR's study (its issuer, which an SR may not carry)."""
    from sqlalchemy import select

    from ..store.models import Patient as PatientRow, Study

    try:
        study_uid = str(pydicom.dcmread(sr_path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                        .StudyInstanceUID)
        with db.session() as s:
            row = s.execute(select(PatientRow.patient_id, PatientRow.issuer_of_patient_id)
                            .join(Study, Study.patient_fk == PatientRow.id)
                            .where(Study.study_instance_uid == study_uid)).first()
    except Exception:  # noqa: BLE001 - the SR's own patient module is used then
        log.debug("index lookup of the SR's patient failed", exc_info=True)
        return None
    return Patient(id=row[0] or "", issuer=row[1] or "") if row is not None else None
