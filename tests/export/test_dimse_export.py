"""C-STORE SCU against a real Orthanc: delivered, refused, unreachable."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.config import Destination
from scp_node.export import ExportError, send_c_store
from tests.support.net import free_port
from tests.support.orthanc import start_orthanc
from tests.support.paths import CXR, need_data

pytestmark = pytest.mark.integration


def test_delivers_to_orthanc_and_reports_unreachable_and_rejecting_peers(tmp_path: Path) -> None:
    src = need_data(CXR / "RG1_UNCR.dcm")
    pacs = start_orthanc(tmp_path / "orthanc", {})
    try:
        dest = Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)
        assert send_c_store(dest, src, calling_ae_title="SCPNODE", timeout=30) == 0x0000
        assert len(pacs.get("/instances")) == 1
    finally:
        pacs.stop()
    closed = Destination("down", "ORTHANC", "127.0.0.1", free_port())
    with pytest.raises(ExportError, match="down"):
        send_c_store(closed, src, calling_ae_title="SCPNODE", timeout=5)
