"""Zero egress: the node runs in its own network namespace (only loopback, with the test PACS in
it) while it receives, analyses and exports; every ``connect()`` its process tree makes is
recorded with strace.  Any destination but the configured PACS, the configured RIS (HL7 over
MLLP) and AF_UNIX fails the test: in the default namespace a connect to anywhere may succeed, so
the recorded list is the proof."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import CXR, IN_CI, REPO, need_data

pytestmark = pytest.mark.integration


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    msg = f"{what} (apt-get install -y strace iproute2 util-linux; needs root or CAP_SYS_ADMIN)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def test_node_connects_only_to_configured_peers(tmp_path: Path, test_model_dir: Path, counts: dict) -> None:
    need_data(CXR / "RG1_UNCR.dcm")
    _need("strace missing", bool(shutil.which("strace")))
    _need("unshare/ip missing", bool(shutil.which("unshare") and shutil.which("ip")))
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    _need("unshare -n not permitted here", probe.returncode == 0)
    script = (f"ip link set lo up && exec {sys.executable} -m tests.faults.egress_driver "
              f"'{tmp_path}' '{test_model_dir}'")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                       cwd=REPO, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("EGRESS-JSON ")]
    assert line, (r.stdout + r.stderr)[-4000:]
    res = json.loads(line[0][len("EGRESS-JSON "):])
    allowed = {("127.0.0.1", res["pacs_port"]), ("::1", res["pacs_port"]),
               ("127.0.0.1", res["hl7_port"]), ("::1", res["hl7_port"]),  # the [[hl7_destinations]] RIS
               # glibc's getaddrinfo sorts addresses (RFC 6724) by connect()ing a UDP socket to the
               # unspecified address, port 0, then AF_UNSPEC to undo it: no packet leaves.
               ("0.0.0.0", 0), ("::", 0)}
    inet = [c for c in res["connects"] if c["family"] in ("AF_INET", "AF_INET6")]
    other = [c for c in res["connects"] if c["family"] not in ("AF_INET", "AF_INET6", "AF_UNIX", "AF_UNSPEC")]
    bad = [c for c in inet if (c["address"], c["port"]) not in allowed]
    counts.update(connects_recorded=len(res["connects"]), inet_connects=len(inet),
                  to_configured_pacs=len([c for c in inet if c["port"] == res["pacs_port"]]),
                  to_configured_ris=len([c for c in inet if c["port"] == res["hl7_port"]]),
                  to_anything_else=len(bad) + len(other),
                  interfaces=res["interfaces"], sr_in_pacs=res.get("sr_in_pacs"))
    assert res["interfaces"] == ["lo"], res["interfaces"]
    assert res.get("store_rc") == 0 and res.get("sr_in_pacs") == 1, res
    assert res["node_rc"] == 0, res
    assert [c for c in inet if c["port"] == res["pacs_port"]], "the export must show up as a connect()"
    assert res.get("hl7_received") == 1, res
    assert [c for c in inet if c["port"] == res["hl7_port"]], "the HL7 export must show up as a connect()"
    assert not bad and not other, bad + other
