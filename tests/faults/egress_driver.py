"""Run inside a fresh network namespace (``unshare -n``): Orthanc, the node under ``strace -f -e
trace=connect``, a DCMTK sender; receive, analyse, export; print a JSON summary of every
``connect()`` the node's process tree made.  Driven by ``test_egress.py``; not a test itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.mllp import MLLPListener
from tests.support.net import free_port, wait_for, wait_port
from tests.support.node import _env, write_config
from tests.support.orthanc import start_orthanc
from tests.support.paths import CXR, REPO, tool

_INET = re.compile(r'connect\(\d+, \{sa_family=(AF_INET6?), sin6?_port=htons\((\d+)\),.*?'
                   r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
_FAMILY = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)")


def parse(trace: Path) -> list[dict[str, object]]:
    """Every connect() in the strace output files as family/address/port (AF_UNIX: the path)."""
    out = []
    for f in sorted(trace.parent.glob(trace.name + "*")):
        for line in f.read_text(errors="replace").splitlines():
            if "connect(" not in line or "resumed" in line and "connect(" not in line:
                continue
            if m := _INET.search(line):
                out.append({"family": m.group(1), "port": int(m.group(2)), "address": m.group(3) or m.group(4)})
            elif m := _FAMILY.search(line):
                out.append({"family": m.group(1), "port": None, "address": ""})
    return out


def main(work: Path, model: Path) -> None:
    node_port = free_port()
    orthanc = start_orthanc(work / "orthanc", {"scpnode": ("SCPNODE", "127.0.0.1", node_port)})
    folder = work / "node"
    folder.mkdir(parents=True, exist_ok=True)
    ris = MLLPListener("AA")  # the HIS/RIS that gets an HL7 ORU^R01 per SR (tests/support/mllp.py)
    hl7_port, ris_receiver = ris.__enter__()
    config = write_config(folder, model_dir=model, port=node_port, stable_seconds=1,
                          peers=[("STORESCU", "127.0.0.1"), ("ORTHANC", "127.0.0.1")],
                          destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                         "port": orthanc.dicom_port}],
                          extra=f'[[hl7_destinations]]\nname = "ris"\nhost = "127.0.0.1"\nport = {hl7_port}\n')
    trace = work / "connect.trace"
    log = open(folder / "node.log", "wb")
    proc = subprocess.Popen([tool("strace"), "-f", "-e", "trace=connect", "-o", str(trace), sys.executable, "-m",
                             "scp_node", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, env=_env(), stdin=subprocess.DEVNULL)
    result: dict[str, object] = {"node_port": node_port, "pacs_port": orthanc.dicom_port, "hl7_port": hl7_port}
    try:
        wait_port(node_port, timeout=240)
        r = subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1", str(node_port),
                            str(CXR / "RG1_UNCR.dcm")], capture_output=True, text=True, timeout=120)
        result["store_rc"] = r.returncode
        study = wait_for(lambda: orthanc.get("/studies"), 120, what="study in Orthanc")[0]
        wait_for(lambda: orthanc.sr_series(study), 240, interval=1.0, what="SR in Orthanc")
        result["sr_in_pacs"] = len(orthanc.sr_series(study))
        wait_for(lambda: ris_receiver.received or None, 60, interval=0.5, what="ORU^R01 at the RIS")
        result["hl7_received"] = len(ris_receiver.received)
    finally:
        pid = json.loads((folder / "scp-node.pid").read_text())["pid"] if (folder / "scp-node.pid").exists() else None
        if pid:
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        orthanc.stop()
        ris.__exit__(None, None, None)
    time.sleep(0.5)
    result["node_rc"] = proc.returncode
    result["connects"] = parse(trace)
    import socket

    result["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    print("EGRESS-JSON " + json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
