"""Attack probe (issue 21, defect 2): another patient's images filed under an existing series.

A data set that reuses an existing Series Instance UID with another Study Instance UID and Patient
ID was answered Success (C-STORE and STOW-RS) and indexed into the existing series: QIDO for the
first patient returned the other patient's instance, and the first series' analysis then failed for
good ("evidence spans more than one study").  Now such an instance is refused -- 0xA900 on DIMSE,
HTTP 409 with FailureReason 0xA900 on STOW-RS -- nothing of it is kept, the refusal is audited,
the other parts of the same STOW request are stored, and the first series is analysed normally
(its SR is made).  The node runs as a subprocess, as an admin runs it.
"""

from __future__ import annotations

import sqlite3
from io import BytesIO
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scp_node.web import token_sha256
from tests.support.net import free_port, wait_for, wait_port
from tests.support.node import NodeProcess, start_node, write_config
from tests.support.paths import CXR, need_data
from tests.web.conftest import TOKEN

from .helpers import count_event, events, instance_counts, query

pytestmark = pytest.mark.integration

ATTACKER_ID = "ATTACKER-0042"
SERIES_CONFLICT = "Series Instance UID already belongs to another study/patient"
BOUNDARY = "issue21-boundary"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def node(tmp_path: Path, test_model_dir: Path) -> Iterator[tuple[NodeProcess, str]]:
    folder = tmp_path / "node"
    folder.mkdir()
    port, web_port = free_port(), free_port()
    extra = f'\n[web]\nhost = "127.0.0.1"\nport = {web_port}\ntoken_sha256 = ["{token_sha256(TOKEN)}"]\n'
    config = write_config(folder, model_dir=test_model_dir, port=port, stable_seconds=2,
                          peers=[("PYSCU", "127.0.0.1")], extra=extra)
    proc = start_node(config, port)
    wait_port(web_port, timeout=60)
    yield proc, f"http://127.0.0.1:{web_port}/dicom-web"
    assert proc.stop() == 0, proc.output()[-3000:]


def _victim() -> Dataset:
    """The first patient's CR (one instance, one series), with fresh UIDs."""
    ds = pydicom.dcmread(need_data(CXR / "RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _copy(ds: Dataset, **changes: str) -> Dataset:
    """``ds`` as another instance (new SOP Instance UID) with some attributes changed."""
    out = pydicom.dcmread(BytesIO(_part10(ds)))
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out


def _part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _c_store(port: int, ds: Dataset) -> tuple[int, str]:
    """pynetdicom as the SCU: (status, error comment)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def _stow(root: str, *datasets: Dataset) -> requests.Response:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _part10(ds) + b"\r\n"
                    for ds in datasets) + f"--{BOUNDARY}--\r\n".encode()
    return requests.post(f"{root}/studies", data=body, timeout=60, headers=dict(
        AUTH, **{"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}))


def _qido(root: str, path: str, **params: str) -> list[Dataset]:
    rsp = requests.get(f"{root}/{path}", params=params, headers=dict(AUTH, Accept="application/dicom+json"),
                       timeout=60)
    assert rsp.status_code in (200, 204), rsp.text[:300]
    return [Dataset.from_json(d) for d in rsp.json()] if rsp.status_code == 200 and rsp.content else []


def test_a_series_uid_reused_for_another_patient_is_refused_on_dimse_and_stow(
        node: tuple[NodeProcess, str], counts: dict) -> None:
    proc, root = node
    folder = proc.config.parent
    victim = _victim()
    assert _c_store(proc.port, victim) == (0x0000, "")

    # 1. C-STORE: the victim's Series Instance UID, another study and patient.
    attack_dimse = _copy(victim, StudyInstanceUID=generate_uid(), PatientID=ATTACKER_ID, PatientName="Probe^Attack")
    status, comment = _c_store(proc.port, attack_dimse)
    assert (status, comment) == (0xA900, SERIES_CONFLICT)

    # 2. STOW-RS: the same attack.
    attack_stow = _copy(victim, StudyInstanceUID=generate_uid(), PatientID=ATTACKER_ID, PatientName="Probe^Attack")
    rsp = _stow(root, attack_stow)
    assert rsp.status_code == 409, rsp.text[:500]
    (failed,) = Dataset.from_json(rsp.json()).FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, int(failed.FailureReason)) == (attack_stow.SOPInstanceUID, 0xA900)

    # 3. STOW-RS: a new series in the victim's study, for another patient.
    attack_study = _copy(victim, SeriesInstanceUID=generate_uid(), PatientID=ATTACKER_ID)
    rsp = _stow(root, attack_study)
    assert rsp.status_code == 409, rsp.text[:500]
    assert [int(f.FailureReason) for f in Dataset.from_json(rsp.json()).FailedSOPSequence] == [0xA900]

    # 4. One STOW-RS request, an attack beside an innocent instance: only the attack fails.
    innocent = _copy(victim, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientID="OTHER-1")
    attack_mixed = _copy(victim, StudyInstanceUID=generate_uid(), PatientID=ATTACKER_ID)
    rsp = _stow(root, attack_mixed, innocent)
    assert rsp.status_code == 202, rsp.text[:500]
    answer = Dataset.from_json(rsp.json())
    assert [r.ReferencedSOPInstanceUID for r in answer.ReferencedSOPSequence] == [innocent.SOPInstanceUID]
    assert [(f.ReferencedSOPInstanceUID, int(f.FailureReason)) for f in answer.FailedSOPSequence] == [
        (attack_mixed.SOPInstanceUID, 0xA900)]

    attacks = {ds.SOPInstanceUID for ds in (attack_dimse, attack_stow, attack_study, attack_mixed)}
    # Nothing of the attacks is kept: two instances (the victim, the innocent one), two files.
    assert instance_counts(folder) == (2, 2)
    assert not attacks & {uid for (uid,) in query(folder, "select sop_instance_uid from instances")}
    assert query(folder, "select count(*) from patients where patient_id = ?", ATTACKER_ID) == [(0,)]
    assert query(folder, "select count(*) from series where series_instance_uid = ?",
                 victim.SeriesInstanceUID) == [(1,)]
    # QIDO: the victim's series holds the victim's instance only; no attack is found anywhere.
    in_series = _qido(root, f"studies/{victim.StudyInstanceUID}/series/{victim.SeriesInstanceUID}/instances")
    assert [d.SOPInstanceUID for d in in_series] == [victim.SOPInstanceUID]
    assert not _qido(root, "studies", PatientID=ATTACKER_ID)
    assert not attacks & {d.SOPInstanceUID for d in _qido(root, "instances", PatientID=str(victim.PatientID))}
    # Every refusal is audited (0xA900 and the reason), with no clear patient identifier.
    rejected = [detail for _o, _ae, detail in events(folder, "instance.rejected")]
    assert len(rejected) == 4 and all("0xA900" in d and "already belongs to another" in d for d in rejected), rejected
    with sqlite3.connect(folder / "index.db") as con:
        audit_dump = "\n".join(str(r) for r in con.execute("select * from audit_events"))
    assert ATTACKER_ID not in audit_dump and str(victim.PatientID) not in audit_dump

    # The victim's series is analysed as usual: its SR is made (and nothing failed).
    def victim_sr() -> list[tuple]:
        failed_runs = [d for _o, _ae, d in events(folder, "analysis.failed")]
        assert not failed_runs, failed_runs
        return query(folder, "select r.study_instance_uid from reports r join analysis_jobs j on r.job_fk = j.id "
                             "join series s on j.series_fk = s.id where s.series_instance_uid = ?",
                     victim.SeriesInstanceUID)

    assert wait_for(victim_sr, 300, interval=1.0, what="the SR of the victim's series") == [
        (victim.StudyInstanceUID,)]
    assert count_event(folder, "sr.created") >= 1
    counts.update(attacks_tried=4, refused_0xA900=len(rejected), victim_sr=1)
