"""DICOM TLS for the SCP and the export SCU, against DCMTK's TLS-enabled tools.

Certificates are made here with the ``openssl`` CLI: a test CA, the node's certificate, a client
certificate signed by the CA, a self-signed "rogue" client certificate, and one for the PACS.
Accepted: echoscu/storescu with the CA-signed client certificate.  Refused: a plain connection,
the self-signed client, anonymous TLS.  The SR goes out over TLS to DCMTK ``storescp +tls``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_for, wait_port
from tests.support.node import start_node, write_config
from tests.support.paths import CXR, need_data, tool

from .helpers import count_event, events, instance_counts

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _certs(folder: Path) -> Path:
    folder.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=scp-node test CA", cwd=folder)
    for name in ("node", "client", "pacs"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", cwd=folder)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "2", "-subj", "/CN=client", cwd=folder)
    return folder


def test_tls_scp_accepts_only_ca_signed_clients_and_exports_over_tls(tmp_path: Path, node_port: int,
                                                                     test_model_dir: Path, counts: dict) -> None:
    pki = _certs(tmp_path / "pki")
    pacs_port = free_port()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen([tool("storescp"), "-aet", "TLSPACS", "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
                             "+cf", str(pki / "ca.crt"), "-od", str(pacs_dir), str(pacs_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=1,
                          peers=[("ECHOSCU", "127.0.0.1"), ("STORESCU", "127.0.0.1")],
                          destinations=[{"name": "tlspacs", "ae_title": "TLSPACS", "host": "127.0.0.1",
                                         "port": pacs_port, "tls": True, "tls_ca": str(pki / "ca.crt"),
                                         "tls_cert": str(pki / "node.crt"), "tls_key": str(pki / "node.key")}])
    text = config.read_text().replace('port = %d\n' % node_port, 'port = %d\ntls_cert = "%s"\ntls_key = "%s"\n'
                                      'tls_ca = "%s"\n' % (node_port, pki / "node.crt", pki / "node.key",
                                                           pki / "ca.crt"), 1)
    config.write_text(text)
    node = start_node(config, node_port)
    tls_client = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    cases = {
        "plain (no TLS)": [],
        "self-signed client certificate": ["+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                                           "+cf", str(pki / "ca.crt")],
        "anonymous TLS": ["+tla", "+cf", str(pki / "ca.crt")],
    }

    def echo(extra: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("echoscu"), "-aet", "ECHOSCU", "-aec", "SCPNODE", *extra, "127.0.0.1",
                               str(node_port)], capture_output=True, text=True, timeout=60)

    try:
        wait_port(pacs_port, timeout=30)
        # A caller that connects and says nothing must not hold up the others (handshakes run
        # in each association's thread, not in the accept loop).
        import socket

        silent = socket.create_connection(("127.0.0.1", node_port))
        ok = echo(tls_client)
        silent.close()
        assert ok.returncode == 0, ok.stdout + ok.stderr
        refused = {what: echo(extra) for what, extra in cases.items()}
        for what, r in refused.items():
            assert r.returncode != 0, what
        r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", *tls_client, "127.0.0.1",
                            str(node_port), str(need_data(CXR / "RG1_UNCR.dcm"))],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: count_event(folder, "export.ok"), 240, interval=0.5, what="SR exported over TLS")
        assert node.proc.poll() is None
    finally:
        assert node.stop() == 0, node.output()[-3000:]
        pacs.terminate()
        pacs.wait(timeout=20)
    received = [p for p in pacs_dir.rglob("*") if p.is_file()]
    tls_rows = [d for _, _, d in events(folder, "association.rejected") if d.startswith("TLS handshake failed")]
    counts.update(accepted_tls_ca_signed=2, refused_tried=len(cases),
                  refused=sum(1 for r in refused.values() if r.returncode != 0),
                  refusals_audited=len(tls_rows), indexed=instance_counts(folder)[0],
                  sr_received_by_tls_pacs=len(received))
    assert len(tls_rows) == len(cases), tls_rows
    assert instance_counts(folder) == (1, 1)
    assert len(received) == 1 and received[0].name.startswith("SR")
    assert [d for _, _, d in events(folder, "export.ok") if "tlspacs" in d]
