"""Disk guard: below ``[store] min_free_bytes`` / ``min_free_percent`` every store is refused with
0xA700 Out of Resources and an audit row saying why; nothing is written, the node keeps serving."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.node import start_node, write_config
from tests.support.paths import CT_DIR, data_files, need_data, tool

from .helpers import events, instance_counts, set_keys, stored_files

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]  # fast path and pynetdicom's own


def test_below_the_watermark_stores_are_refused_out_of_resources(tmp_path: Path, node_port: int,
                                                                 test_model_dir: Path, counts: dict) -> None:
    key = "min_free_bytes"
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1")])
    usage = shutil.disk_usage(tmp_path)
    # A watermark above the real free space: no need to fill a disk.
    value = usage.free + 2**30
    set_keys(config, "store", **{key: value})
    node = start_node(config, node_port)
    files = data_files(CT_DIR, at_least=5)[:5]
    try:
        r = subprocess.run([tool("storescu"), "-v", "--no-halt", "-aet", "STORESCU", "-aec", "SCPNODE", "127.0.0.1",
                            str(node_port), *map(str, files)], capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        refused = len(re.findall(r"Store Response \((?:Refused: )?Out ?Of ?Resources", out, re.IGNORECASE))
        rows = [d for _, _, d in events(folder, "instance.rejected") if "disk guard" in d and d.startswith("0xA700")]
        echo = subprocess.run([tool("echoscu"), "-aet", "ECHOSCU", "-aec", "SCPNODE", "127.0.0.1", str(node_port)],
                              capture_output=True, text=True, timeout=60)
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    counts.update(stores_tried=len(files), refused_out_of_resources=refused, audit_rows=len(rows),
                  indexed=instance_counts(folder)[0], files=len(stored_files(folder)))
    assert refused == len(files), out
    assert len(rows) == len(files)
    assert instance_counts(folder) == (0, 0) and not stored_files(folder)
    assert echo.returncode == 0


def test_percent_watermark_in_process(tmp_path: Path) -> None:
    """``min_free_percent`` the same way, on the Ingestor itself (no second node start needed)."""
    from scp_node.audit import AuditTrail
    from scp_node.store.db import Database
    from scp_node.store.ingest import Ingestor, Origin, StorageFailure

    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    ingestor = Ingestor(db, tmp_path / "storage", AuditTrail(db, b"k" * 32), min_free_percent=99.99)
    with pytest.raises(StorageFailure, match="disk guard"):
        ingestor.ingest(data_files(CT_DIR)[0].read_bytes(), Origin("X", "127.0.0.1"))
    assert not (tmp_path / "storage").exists() or not any((tmp_path / "storage").rglob("*"))
    ok = Ingestor(db, tmp_path / "storage", AuditTrail(db, b"k" * 32), min_free_percent=0.001)
    ok.ingest(data_files(CT_DIR)[0].read_bytes(), Origin("X", "127.0.0.1"))
