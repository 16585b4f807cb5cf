"""The Query/Retrieve SCU against a real Orthanc: C-FIND at study and series level, C-MOVE to a
DCMTK storescp, C-GET into the node's own Ingestor; and the deadline against a closed port, a
PACS that accepts connections but never answers, and a PACS that does not know the destination."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from scp_node.config import PriorSource
from scp_node.dimse.query_retrieve import QueryRetrieveError, QueryRetrieveSCU
from scp_node.store.ingest import Ingestor, Origin
from scp_node.store.models import Instance
from tests.support.net import free_port, wait_port
from tests.support.orthanc import Orthanc, start_orthanc
from tests.support.paths import tool
from tests.support.priors import PATIENT_ID, derived_cxr

pytestmark = pytest.mark.integration

MOVE_AET = "SCPNODE"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, int, dict[str, Path]]]:
    """Orthanc holding two studies of the patient (2023: PA + lateral series; 2021: PA) and one of
    another patient; it knows ``SCPNODE`` at a port where the C-MOVE test runs storescp."""
    folder = tmp_path_factory.mktemp("qr")
    dest_port = free_port()
    orthanc = start_orthanc(folder / "orthanc", {"scpnode": (MOVE_AET, "127.0.0.1", dest_port)}, verbose=True)
    files = {"pa_2023": derived_cxr(folder / "pa_2023.dcm", study_date="20230105"),
             "pa_2021": derived_cxr(folder / "pa_2021.dcm", study_date="20210611", study_time="080000"),
             "other": derived_cxr(folder / "other.dcm", study_date="20230105", patient_id="SOMEONE-ELSE")}
    pa = pydicom.dcmread(files["pa_2023"], stop_before_pixels=True)
    files["lat_2023"] = derived_cxr(folder / "lat_2023.dcm", study_date="20230105", ViewPosition="LL",
                                    StudyInstanceUID=pa.StudyInstanceUID)
    try:
        for f in files.values():
            assert orthanc.upload(f)["Status"] == "Success"
        yield orthanc, dest_port, files
    finally:
        orthanc.stop()


def _source(port: int, timeout: float = 20, **kw: object) -> PriorSource:
    values: dict[str, object] = {"move_destination": MOVE_AET, **kw}
    return PriorSource(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port, timeout_seconds=timeout,
                       **values)  # type: ignore[arg-type]


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_find_studies_then_series(pacs: tuple[Orthanc, int, dict[str, Path]]) -> None:
    orthanc, _, files = pacs
    scu = QueryRetrieveSCU(_source(orthanc.dicom_port), MOVE_AET)
    studies = scu.find_studies(PATIENT_ID, "", "20200101", "20240101")
    assert sorted(s.study_date for s in studies) == ["20210611", "20230105"]  # not the other patient's
    assert {s.patient_id for s in studies} == {PATIENT_ID}
    assert {(s.patient_sex, s.patient_birth_date, s.modalities) for s in studies} == {("F", "19600101", ("CR",))}
    # The date range is applied by the PACS.
    assert [s.study_date for s in scu.find_studies(PATIENT_ID, "", "20220101", "20240101")] == ["20230105"]
    study_uid, pa_series, _ = _uids(files["pa_2023"])
    series = {s.series_instance_uid: s for s in scu.find_series(study_uid)}
    assert len(series) == 2
    assert (series[pa_series].modality, series[pa_series].view_position, series[pa_series].body_part_examined,
            series[pa_series].instances) == ("CR", "PA", "CHEST", 1)
    assert {s.view_position for s in series.values()} == {"PA", "LL"}
    assert "Incoming Find request from AET SCPNODE" in orthanc.log()


def test_move_series_to_storescp(tmp_path: Path, pacs: tuple[Orthanc, int, dict[str, Path]]) -> None:
    orthanc, dest_port, files = pacs
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen([tool("storescp"), "-aet", MOVE_AET, "-od", str(received), str(dest_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(dest_port, timeout=30)
        study_uid, series_uid, sop_uid = _uids(files["pa_2023"])
        outcome = QueryRetrieveSCU(_source(orthanc.dicom_port), MOVE_AET).move_series(study_uid, series_uid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (outcome.status, outcome.completed, outcome.failed) == (0, 1, 0)
    got = [pydicom.dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
    assert [str(d.SOPInstanceUID) for d in got] == [sop_uid]  # only the PA series, not the lateral
    assert f'Move-SCU request received for AET "{MOVE_AET}"' in orthanc.log()


def test_get_series_into_the_ingestor(pacs: tuple[Orthanc, int, dict[str, Path]], ingestor: Ingestor) -> None:
    orthanc, _, files = pacs
    study_uid, series_uid, sop_uid = _uids(files["pa_2021"])
    origin = Origin(ae_title="ORTHANC", address="127.0.0.1", via="dimse")
    outcome = QueryRetrieveSCU(_source(orthanc.dicom_port), MOVE_AET).get_series(
        study_uid, series_uid, lambda data, sop_class: ingestor.ingest(data, origin, expected_sop_class=sop_class))
    assert (outcome.status, outcome.completed, outcome.failed, outcome.stored) == (0, 1, 0, 1)
    with ingestor.db.session() as s:
        rows = s.query(Instance).all()
        assert [(r.sop_instance_uid, r.calling_ae_title) for r in rows] == [(sop_uid, "ORTHANC")]
        stored = ingestor.storage_dir / rows[0].path
    # Kept byte for byte as the PACS sent it: the same pixels as the file Orthanc was given.
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(files["pa_2021"]).PixelData
    assert "C-GET-SCU request received" in orthanc.log()


def test_get_refused_instance_counts_as_failed(pacs: tuple[Orthanc, int, dict[str, Path]]) -> None:
    orthanc, _, files = pacs
    study_uid, series_uid, _ = _uids(files["pa_2021"])

    def refuse(data: object, sop_class: str) -> None:
        raise OSError("disk full")

    # Orthanc answers 0xA702 when every sub-operation failed: an error, with the counts.
    with pytest.raises(QueryRetrieveError, match="C-GET with status 0xA702.*0 completed, 1 failed"):
        QueryRetrieveSCU(_source(orthanc.dicom_port), MOVE_AET).get_series(study_uid, series_uid, refuse)


def test_unknown_move_destination_is_an_error(pacs: tuple[Orthanc, int, dict[str, Path]]) -> None:
    orthanc, _, files = pacs
    study_uid, series_uid, _ = _uids(files["pa_2023"])
    scu = QueryRetrieveSCU(_source(orthanc.dicom_port, move_destination="NOBODY"), MOVE_AET)
    with pytest.raises(QueryRetrieveError, match="C-MOVE with status 0x"):
        scu.move_series(study_uid, series_uid)


def test_closed_port_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(QueryRetrieveError, match="failed") as info:
        QueryRetrieveSCU(_source(free_port(), timeout=30), MOVE_AET).find_studies(PATIENT_ID, "", "20200101", "20240101")
    assert time.monotonic() - started < 5
    assert not info.value.timed_out


@pytest.fixture
def silent_pacs() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung PACS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_silent_pacs_costs_the_timeout_and_no_more(silent_pacs: int) -> None:
    started = time.monotonic()
    with pytest.raises(QueryRetrieveError, match="did not answer within 3 s") as info:
        QueryRetrieveSCU(_source(silent_pacs, timeout=3), MOVE_AET).find_studies(PATIENT_ID, "", "20200101", "20240101")
    elapsed = time.monotonic() - started
    assert info.value.timed_out
    assert 2.5 < elapsed < 6, elapsed


def test_the_deadline_is_shared_by_every_operation(pacs: tuple[Orthanc, int, dict[str, Path]]) -> None:
    orthanc, _, _ = pacs
    scu = QueryRetrieveSCU(_source(orthanc.dicom_port, timeout=1), MOVE_AET, deadline=time.monotonic() - 0.1)
    with pytest.raises(QueryRetrieveError, match="did not answer within 1 s"):
        scu.find_studies(PATIENT_ID, "", "20200101", "20240101")
