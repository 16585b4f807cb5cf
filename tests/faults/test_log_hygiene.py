"""The node's log as an attacker on the LAN and a privacy officer read it.

- Control characters from the wire (an AE title with CR/LF/ESC, an HTTP path with ``%0D%0A``)
  are escaped in every line: nothing a peer sends can start a forged log line or drive the
  admin's terminal.
- No patient data from any library: highdicom warned with the Patient's Name in clear when it
  built the SR; such messages are withheld (their origin stays).
- The end-to-end canary: a patient with a distinctive name and ID goes in by C-STORE and by
  STOW-RS, SRs are built, and ``grep`` of the node's log finds neither.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import warnings
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from scp_node import logs
from scp_node.web import token_sha256
from tests.handlers.test_request_flood import associate_rq, send_request
from tests.support.net import free_port, wait_for
from tests.support.node import start_node, write_config
from tests.support.paths import CXR, need_data
from tests.web.conftest import TOKEN

from .helpers import acknowledged, query, storescu

CANARY_NAME = "Zyxwv Qwerty"  # no "^": highdicom warns about it, quoting it (the leak this guards)
CANARY_ID = "PHI-CANARY-7731"
CANARY_PARTS = ("Zyxwv", "Qwerty", CANARY_ID)
#: The start of a log record (FORMAT): a forged line would have to look like this.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """The node's logging (scp_node.logs.configure, DEBUG) into a buffer; undone afterwards."""
    root = logging.getLogger()
    # (``scp-node analyze`` run in-process by another test quiets these to WARNING: start from NOTSET)
    names = ("pynetdicom", "apscheduler", "scp_node", "highdicom", "pydicom")
    saved = (root.level, [(n, logging.getLogger(n).level) for n in names])
    for name in names[2:]:
        logging.getLogger(name).setLevel(logging.NOTSET)
    buf = io.StringIO()
    handler = logs.configure(verbose=True, stream=buf)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
        root.setLevel(saved[0])
        for name, level in saved[1]:
            logging.getLogger(name).setLevel(level)


# -- the formatter and the filters ------------------------------------------------------------

def test_control_characters_are_escaped_and_a_record_stays_one_line(captured_log: io.StringIO) -> None:
    log = logging.getLogger("scp_node.test")
    forged = "2026-01-01 00:00:00,000 INFO scp_node.node: forged"
    log.warning("rejecting association from %s", f"EVIL\r\n{forged}\x1b[2J\u2028\u202eevil\x85\x00")
    try:
        try:
            raise KeyError(f"inner\n{forged}")
        except KeyError as exc:
            raise ValueError(f"outer\r\n{forged}\x1b]0;title\x07") from exc
    except ValueError:
        log.exception("failed for %s", "a\nb")
    out = captured_log.getvalue()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", out)
    assert [ln for ln in out.splitlines() if RECORD_START.match(ln)] == [ln for ln in out.splitlines()
                                                                       if " scp_node.test: " in ln]
    assert "EVIL\\r\\n2026-01-01 00:00:00,000 INFO scp_node.node: forged\\x1b[2J\\u2028\\u202eevil\\x85\\x00" in out
    assert "failed for a\\nb\nTraceback (most recent call last):\n" in out  # the traceback's own lines stay
    assert "ValueError: outer\\r\\n2026-01-01" in out and "KeyError: 'inner\\n2026-01-01" in out
    assert "The above exception was the direct cause of the following exception:" in out


def test_messages_of_dicom_libraries_are_withheld(captured_log: io.StringIO) -> None:
    logging.getLogger("highdicom.base").warning('value of argument "patient_name" is invalid: "%s"', CANARY_NAME)
    logging.getLogger("pydicom").warning("Invalid value for VR PN: %r", CANARY_NAME)
    warnings.warn_explicit(f"The string {CANARY_NAME!r} is unlikely to be a person name", UserWarning,
                           "/x/site-packages/highdicom/base.py", 199)
    warnings.warn_explicit("an ordinary warning", UserWarning, "/x/site-packages/torch/nn.py", 3)
    out = captured_log.getvalue()
    assert "Zyxwv" not in out
    assert "highdicom.base: message withheld" in out and "pydicom: message withheld" in out
    assert "warning withheld" in out and "base.py:199, UserWarning" in out
    assert "an ordinary warning" in out  # other libraries' warnings are kept


def test_building_an_sr_logs_no_patient_data(captured_log: io.StringIO) -> None:
    from scp_node.report import ReportingNode, build_measurement_report
    from tests.report.conftest import CXR_RG1, _make_result

    ds = pydicom.dcmread(need_data(CXR_RG1), stop_before_pixels=True)
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    sr = build_measurement_report([ds], _make_result([ds]), node=ReportingNode(ae_title="SCPNODE"))
    assert str(sr.PatientName) == CANARY_NAME  # the SR keeps it; the log must not
    out = captured_log.getvalue()
    assert "built SR" in out and "highdicom.base" in out  # DEBUG: every library line there is
    assert not [part for part in CANARY_PARTS if part in out], out
    assert "warning withheld" in out  # highdicom's person-name warning, without the name


def test_repeated_library_warnings_are_held_back() -> None:
    now = [0.0]
    limit = logs.RepeatLimit(clock=lambda: now[0])

    def record(name: str, line: int, msg: str = "non-conformant UID", level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, "/x/pynetdicom/presentation.py", line, msg, None, None)

    passed = [r for r in (record("pynetdicom.presentation", 266) for _ in range(2000)) if limit.filter(r)]
    assert len(passed) == limit.per_thread + 1 and "held back" in passed[-1].getMessage()
    assert limit.filter(record("pynetdicom.presentation", 271))  # another call site has its own count
    assert limit.filter(record("pynetdicom.presentation", 266, level=logging.ERROR))  # errors always pass
    assert all(limit.filter(record("scp_node.dimse.listener", 1)) for _ in range(100))  # ours are never held back
    now[0] = 61.0
    resumed = record("pynetdicom.presentation", 266)
    assert limit.filter(resumed) and "1994 similar messages were held back" in resumed.getMessage()


# -- against the node ----------------------------------------------------------------------------

def _canary_copy(source: Path, out: Path) -> pydicom.Dataset:
    """``source`` as a new study of the canary patient (new UIDs), written to ``out``."""
    ds = pydicom.dcmread(source)
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return ds


@pytest.mark.integration
def test_no_patient_data_and_no_forged_lines_in_the_node_log(tmp_path: Path, node_port: int,
                                                               test_model_dir: Path, counts: dict) -> None:
    source = need_data(CXR / "CR-MONO1-10-chest_barre.dcm")
    by_dimse = tmp_path / "dimse.dcm"
    by_web = tmp_path / "web.dcm"
    _canary_copy(source, by_dimse)
    web_ds = _canary_copy(source, by_web)
    folder = tmp_path / "node"
    folder.mkdir()
    web_port = free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=1,
                          peers=[("STORESCU", "127.0.0.1")], extra=extra)
    node = start_node(config, node_port)
    try:
        # The attacker: an AE title and an HTTP path that try to forge a log line and drive a terminal.
        rj = send_request(node_port, associate_rq(b"X\r\nFORGED\x1b[2J", b"SCPNODE", 1))
        assert rj[:1] == b"\x03"
        rsp = requests.get(f"http://127.0.0.1:{web_port}/dicom-web/studies%0D%0AFORGED-WEB%1B%5B2J", timeout=30)
        assert rsp.status_code == 401
        # The canary patient, by C-STORE and by STOW-RS.
        sender = storescu(node_port, [by_dimse])
        out = sender.communicate(timeout=120)[0]
        assert acknowledged(out) == [by_dimse], out
        boundary = "canary-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + by_web.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        stow = requests.post(f"http://127.0.0.1:{web_port}/dicom-web/studies", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert stow.status_code == 200, stow.text
        reports = wait_for(lambda: (rows := query(folder, "select path from reports")) and len(rows) == 2 and rows,
                           300, interval=1.0, what="an SR for each canary study")
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    srs = [pydicom.dcmread(folder / "storage" / r[0]) for r in reports]
    assert {str(sr.PatientName) for sr in srs} == {CANARY_NAME} and {sr.PatientID for sr in srs} == {CANARY_ID}
    assert web_ds.StudyInstanceUID in {sr.StudyInstanceUID for sr in srs}

    grep = subprocess.run(["grep", "-c", "-i", "-E", "|".join(CANARY_PARTS), str(node.log)], capture_output=True,
                          text=True)
    log_bytes = node.log.read_bytes()
    lines = log_bytes.decode("utf-8", "replace").splitlines()
    forged = [ln for ln in lines if ln.startswith("FORGED")]
    counts.update(log_lines=len(lines), canary_matches=int(grep.stdout.strip() or 0), forged_lines=len(forged),
                  escape_bytes=log_bytes.count(b"\x1b"), srs=len(srs))
    assert grep.returncode == 1 and grep.stdout.strip() == "0", [ln for ln in lines if "Zyxwv" in ln or CANARY_ID in ln]
    # (tqdm progress bars of a library may write CR and ESC of their own: only the peers' are checked)
    assert b"FORGED\x1b" not in log_bytes and b"FORGED-WEB\x1b" not in log_bytes and b"\r\nFORGED" not in log_bytes
    assert not forged
    assert "rejecting association from X\\r\\nFORGED\\x1b[2J" in node.output()
    assert "/dicom-web/studies\\r\\nFORGED-WEB\\x1b[2J" in node.output()
    assert "warning withheld" in node.output()  # highdicom's person-name warning, without the name
