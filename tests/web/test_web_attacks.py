"""Attacks on the DICOMweb service by a client holding one valid token (issue 21), against the node
as a subprocess: each test reproduces the probe that found the defect and fails without its fix.

- A QIDO wildcard of thousands of ``*`` used to backtrack for minutes while holding the
  interpreter lock; now it is answered at once, and the DIMSE port with it.
- A STOW body of 51,000 one-byte parts used to be parsed whole (30 s, one audit row per part);
  now it is refused with 413 after ``[web] max_parts`` parts, with one audit row.
- A Transfer Syntax UID in the index that is not a UID (written before ingest checked it) never
  reaches a response header.
"""

from __future__ import annotations

import http.client
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from scp_node.web import token_sha256
from tests.support.net import free_port
from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import CXR, data_files, tool
from tests.web.conftest import TOKEN

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def node(tmp_path: Path, test_model_dir: Path) -> Iterator[tuple[NodeProcess, int, str]]:
    folder = tmp_path / "node"
    folder.mkdir()
    dimse_port, web_port = free_port(), free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    config = write_config(folder, model_dir=test_model_dir, port=dimse_port, stable_seconds=3600, extra=extra,
                          peers=[("ECHOSCU", "127.0.0.1")])
    proc = start_node(config, dimse_port)
    root = f"http://127.0.0.1:{web_port}/dicom-web"
    yield proc, dimse_port, root
    proc.stop()


def _stow(root: str, *files: Path) -> requests.Response:
    boundary = "b0undary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    return requests.post(f"{root}/studies", data=body, timeout=60, headers={
        **AUTH, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _audit(proc: NodeProcess) -> list[tuple[str, str, str]]:
    with sqlite3.connect(proc.config.parent / "index.db") as con:
        return con.execute("select event, outcome, detail from audit_events order by id").fetchall()


def _echo(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    done = subprocess.run([tool("echoscu"), "-aet", "ECHOSCU", "-aec", "SCPNODE", "127.0.0.1", str(port)],
                          capture_output=True, timeout=60)
    return done.returncode, time.monotonic() - t0


def test_many_star_wildcard_is_answered_at_once_and_the_dimse_port_with_it(node) -> None:  # type: ignore[no-untyped-def]
    proc, dimse_port, root = node
    cxr = data_files(CXR)[0]
    assert _stow(root, cxr).status_code == 200
    timings: dict[str, float] = {}

    def qido(name: str, value: str) -> None:
        t0 = time.monotonic()
        rsp = requests.get(f"{root}/studies", params={"PatientName": value}, headers=AUTH, timeout=120)
        timings[name] = time.monotonic() - t0
        timings[name + ".status"] = rsp.status_code

    attack = threading.Thread(target=qido, args=("stars", "*" * 3000 + "x"))
    attack.start()
    time.sleep(0.05)
    rc, echo_seconds = _echo(dimse_port)
    attack.join(120)
    assert rc == 0 and echo_seconds < 5, echo_seconds
    assert timings["stars.status"] == 200
    assert timings["stars"] < 1.0, timings
    # The pieces between stars cannot be made to backtrack either: one '*a' per character.
    qido("alternating", "*a" * 500 + "*x")
    assert timings["alternating.status"] in (200, 400) and timings["alternating"] < 1.0, timings
    # Wildcards still match what they should (case-insensitive for names).
    everyone = requests.get(f"{root}/studies", params={"PatientName": "*"}, headers=AUTH, timeout=30).json()
    assert len(everyone) == 1


def test_fifty_thousand_parts_are_refused_with_413_and_one_audit_row(node) -> None:  # type: ignore[no-untyped-def]
    proc, _dimse_port, root = node
    before = _audit(proc)
    boundary = b"x"
    body = b"".join(b"--x\r\nContent-Type: application/dicom\r\n\r\n\x00\r\n" for _ in range(51_000)) + b"--x--\r\n"
    host, port = root.split("//")[1].split("/")[0].split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=60)
    t0 = time.monotonic()
    try:
        con.request("POST", "/dicom-web/studies", body=body, headers={
            **AUTH, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the node may answer and close before the whole body is sent
    rsp = con.getresponse()
    seconds = time.monotonic() - t0
    assert rsp.status == 413, rsp.read()[:300]
    assert seconds < 1.0, seconds
    new = _audit(proc)[len(before):]
    assert len(new) == 1 and new[0][0] == "stow.refused" and "parts" in new[0][2], new
    assert "parts" in proc.output().splitlines()[-1] or any("413" in line for line in proc.output().splitlines())


def test_an_invalid_stored_transfer_syntax_never_reaches_a_header(node) -> None:  # type: ignore[no-untyped-def]
    proc, _dimse_port, root = node
    cxr = data_files(CXR)[0]
    assert _stow(root, cxr).status_code == 200
    # An index row as a node without the ingest check could have written it.
    with sqlite3.connect(proc.config.parent / "index.db") as con:
        con.execute("update instances set transfer_syntax_uid = ?", ("1.2.840.10008.1.2.1\r\nX-Injected: yes",))
    study = requests.get(f"{root}/studies", headers=AUTH, timeout=30).json()[0]["0020000D"]["Value"][0]
    for accept in ('multipart/related; type="application/dicom"', "application/dicom"):
        rsp = requests.get(f"{root}/studies/{study}", headers={**AUTH, "Accept": accept}, timeout=30)
        assert "X-Injected" not in rsp.headers and b"X-Injected" not in rsp.content
        assert rsp.status_code in (406, 500), rsp.status_code
    # Nothing the client sends is echoed raw into the Warning header either.
    rsp = requests.get(f"{root}/studies", params={"a.b\r\nX-Injected: yes": "1"}, headers=AUTH, timeout=30)
    assert rsp.status_code == 200 and "X-Injected" not in rsp.headers
