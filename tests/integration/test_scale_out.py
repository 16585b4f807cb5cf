"""Scale-out, end to end: two receivers and two workers (separate processes, separate configs and
run-time folders) share one PostgreSQL index and one storage folder.

The spine's CXR and 133-slice CT reach both receivers at once -- Orthanc pushes them to one while
storescu sends the same files to the other -- and every instance is indexed once, each series
analysed once, each SR back in Orthanc once.  Then a worker is killed (-9) in the middle of an
analysis: its claim lapses and the other worker does the job, once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import create_engine, text

from tests.faults.helpers import copy_series, storescu
from tests.support.net import free_port, wait_for, wait_port
from tests.support.node import NodeProcess, _env, cli, write_config
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.paths import CT_DIR, CXR, REPO, need_data

#: The nodes' shared PostgreSQL index is this module's own (tests/integration/conftest.py: no second
#: pass with the index override).
OWN_INDEX = True

pytestmark = pytest.mark.integration

LEASE, BEAT = 10, 2


def _config(root: Path, name: str, model: Path, database_url: str, orthanc_port: int) -> tuple[Path, int]:
    """One node's config: its own folder and run-time folder; the shared index, storage, audit key."""
    folder = root / name
    folder.mkdir()
    port = free_port()
    config = write_config(folder, model_dir=model, port=port, stable_seconds=4,
                          peers=[("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1")],
                          destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                         "port": orthanc_port}])
    body = config.read_text()
    for old, new in [
        (f'database_url = "sqlite:///{folder}/index.db"', f'database_url = "{database_url}"'),
        (f'storage_dir = "{folder}/storage"', f'storage_dir = "{root}/shared/storage"\nvar_dir = "{folder}/var"'),
        (f'secret_file = "{folder}/audit.key"', f'secret_file = "{root}/shared/audit.key"'),
        ("poll_seconds = 0.5", f"poll_seconds = 0.5\nclaim_lease_seconds = {LEASE}\nheartbeat_seconds = {BEAT}"),
        (f"port = {port}", f"port = {port}\nreceiver_processes = 1"),
        # the model sees 8 of the CT's slices: CPU time (the receive and index path gets all 133)
        ('device = "cpu"', 'device = "cpu"\nct_max_slices = 8'),
    ]:
        assert old in body, old
        body = body.replace(old, new)
    config.write_text(body)
    return config, port


def _serve(config: Path, role: str, port: int | None, timeout: float = 180) -> NodeProcess:
    log = config.parent / f"{role}.log"
    proc = subprocess.Popen([sys.executable, "-m", "scp_node", "serve", "--config", str(config), "--role", role],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                            stdin=subprocess.DEVNULL)
    node = NodeProcess(proc, config, port or 0, log)
    ready = "scp-node listening as" if port else "scp-node worker running as"
    try:
        if port:
            wait_port(port, timeout=timeout)
        wait_for(lambda: _up(node, ready), timeout, interval=0.2, what=f"the {role} to start")
    except Exception:
        node.kill9()
        raise
    return node


def _up(node: NodeProcess, ready: str) -> bool:
    if node.proc.poll() is not None:
        raise RuntimeError(f"scp-node exited with {node.proc.returncode}:\n{node.output()[-3000:]}")
    return ready in node.output()


class Index:
    """Read-only look at the shared PostgreSQL index."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def one(self, sql: str, **params: Any) -> Any:
        return self.rows(sql, **params)[0][0]

    def events(self, name: str, like: str = "%") -> int:
        return int(self.one("select count(*) from audit_events where event = :e and detail like :d", e=name, d=like))


def _sr_instances(orthanc: Orthanc, study_id: str) -> list[str]:
    return [i for s in orthanc.sr_series(study_id) for i in s["Instances"]]


@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    """Orthanc, knowing the two receivers' ports once they exist (set by the test)."""
    ports = {"rx1": free_port(), "rx2": free_port()}
    orthanc = start_orthanc(tmp_path / "orthanc", {name: ("SCPNODE", "127.0.0.1", p) for name, p in ports.items()})
    yield orthanc, ports
    orthanc.stop()


def test_two_receivers_two_workers_one_index(tmp_path: Path, pacs: Any, postgres_url: str,
                                             test_model_dir: Path) -> None:
    orthanc, ports = pacs
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    ct = sorted(need_data(CT_DIR).glob("*.dcm"))
    assert len(ct) == 133
    (tmp_path / "shared").mkdir()
    configs = {name: _config(tmp_path, name, test_model_dir, postgres_url, orthanc.dicom_port)
               for name in ("rx1", "rx2", "w1", "w2")}
    for rx in ("rx1", "rx2"):  # the ports Orthanc knows for them
        config, port = configs[rx]
        config.write_text(config.read_text().replace(f"port = {port}\n", f"port = {ports[rx]}\n"))
    index = Index(postgres_url)
    nodes: dict[str, NodeProcess] = {}
    try:
        for rx in ("rx1", "rx2"):
            nodes[rx] = _serve(configs[rx][0], "receiver", ports[rx])
        for w in ("w1", "w2"):
            nodes[w] = _serve(configs[w][0], "worker", None)

        st = json.loads(cli("status", "--config", str(configs["w1"][0]), "--json").stdout)
        assert st["running"] and st["role"] == "worker"
        assert sorted((n["role"], n["state"]) for n in st["fleet"]) == [
            ("receiver", "live"), ("receiver", "live"), ("worker", "live"), ("worker", "live")], st["fleet"]

        # -- the spine to both receivers at once: Orthanc -> rx1, storescu -> rx2 ---------------
        cxr_study = orthanc.upload(cxr)["ParentStudy"]
        last: dict[str, Any] = {}
        for f in ct:
            last = orthanc.upload(f)
        ct_study, ct_series = last["ParentStudy"], last["ParentSeries"]
        cxr_series = orthanc.get(f"/studies/{cxr_study}")["Series"][0]
        pushes = [threading.Thread(target=orthanc.push_series, args=(s, "rx1")) for s in (cxr_series, ct_series)]
        for t in pushes:
            t.start()
        sender = storescu(ports["rx2"], [cxr, *ct])
        out = sender.communicate(timeout=300)[0]
        for t in pushes:
            t.join(300)
        assert sender.returncode == 0, out[-2000:]

        wait_for(lambda: _sr_instances(orthanc, cxr_study) and _sr_instances(orthanc, ct_study), 400,
                 interval=1.0, what="an SR for the CXR and for the CT in Orthanc")
        wait_for(lambda: index.one("select count(*) from export_jobs where state = 'DONE'") == 2, 60,
                 what="both exports settled")
        time.sleep(2 * BEAT + 2)  # a second analysis or export would start within this window

        assert index.one("select count(*) from instances") == 134
        assert index.one("select count(distinct sop_instance_uid) from instances") == 134
        assert index.events("instance.stored") == 134
        assert index.events("instance.duplicate") == 134  # each file arrived twice, kept once
        jobs = index.rows("select s.series_instance_uid, j.state, j.claimed_by from analysis_jobs j "
                          "join series s on s.id = j.series_fk")
        src = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in (cxr, ct[0])}
        assert sorted(s for s, _, _ in jobs) == sorted(src), jobs  # one job per series
        assert all(state == "DONE" for _, state, _ in jobs), jobs
        assert index.one("select count(*) from reports") == 2
        assert index.events("analysis.finished") == 2 and index.events("series.complete") == 2
        assert index.events("export.ok") == 2
        assert len(_sr_instances(orthanc, cxr_study)) == 1 and len(_sr_instances(orthanc, ct_study)) == 1
        workers = {n["name"]: n for n in json.loads(cli("status", "--config", str(configs["rx1"][0]),
                                                        "--json").stdout)["fleet"] if n["role"] == "worker"}
        assert {c for _, _, c in jobs} <= set(workers)

        # -- kill -9 of the worker that holds a running analysis --------------------------------
        copy = copy_series([cxr], tmp_path / "copy")
        assert storescu(ports["rx1"], copy).wait(timeout=120) == 0
        study = str(pydicom.dcmread(copy[0], stop_before_pixels=True).StudyInstanceUID)
        holder = wait_for(lambda: index.rows("select j.id, j.claimed_by from analysis_jobs j where "
                                             "j.state = 'RUNNING' and j.claimed_by <> ''"), 120, interval=0.05,
                          what="a worker running the new job")
        job_id, victim = holder[0]
        pid = int(victim.split(":")[1])
        killed = next(n for n in ("w1", "w2") if nodes[n].proc.pid == pid)
        survivor = "w2" if killed == "w1" else "w1"
        nodes[killed].kill9()
        assert index.events("analysis.finished") == 2, "the analysis finished before the kill"

        wait_for(lambda: index.one("select state from analysis_jobs where id = :i", i=job_id) == "DONE",
                 LEASE + 120, interval=0.5, what="the other worker to finish the job")
        wait_for(lambda: index.events("export.ok") == 3, 60, what="the third SR exported")
        time.sleep(2 * BEAT + 2)
        state, by, attempts = index.rows("select state, claimed_by, attempts from analysis_jobs where id = :i",
                                         i=job_id)[0]
        assert (state, attempts) == ("DONE", 2) and by.split(":")[1] == str(nodes[survivor].proc.pid)
        assert index.one("select count(*) from reports where job_fk = :i", i=job_id) == 1
        assert index.events("analysis.requeued", f"claim expired: worker {victim} stopped renewing%") == 1
        assert index.events("analysis.finished") == 3 and index.events("export.ok") == 3
        orthanc_study = next(s for s in orthanc.get("/studies")
                             if orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] == study)
        assert len(_sr_instances(orthanc, orthanc_study)) == 1

        fleet = json.loads(cli("status", "--config", str(configs["rx2"][0]), "--json").stdout)["fleet"]
        states = {n["name"]: n["state"] for n in fleet}
        assert states[victim] == "lost" and sum(s == "live" for s in states.values()) == 3, fleet
    finally:
        codes = {name: node.stop() for name, node in nodes.items()}
        index.engine.dispose()
    assert all(code == 0 for name, code in codes.items() if name != killed), {
        n: nodes[n].output()[-2000:] for n, c in codes.items() if c != 0}
