"""Orthanc from Debian as the PACS: started on loopback with a config written by the test."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .net import free_port, wait_for, wait_port
from .paths import tool

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class Orthanc:
    """A running Orthanc with helpers for its REST API."""

    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    aet: str
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None,
                timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.request("POST", "/instances", path.read_bytes())

    def push_series(self, series_id: str, modality: str = "scpnode") -> Any:
        return self.request("POST", f"/modalities/{modality}/store",
                            {"Resources": [series_id], "Synchronous": True})

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series")

    def sr_series(self, study_id: str) -> list[dict[str, Any]]:
        return [s for s in self.series_of_study(study_id) if s["MainDicomTags"].get("Modality") == "SR"]

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_orthanc(folder: Path, modalities: dict[str, tuple[str, str, int]], aet: str = "ORTHANC",
                  verbose: bool = False) -> Orthanc:
    """Start Orthanc with storage in ``folder`` and the given DICOM modalities (name -> AET, host, port).

    ``verbose``: Orthanc's ``--verbose`` log, which names each incoming C-FIND, C-MOVE and C-GET."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "scp-node-test-pacs",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {name: list(v) for name, v in modalities.items()},
        "Plugins": [DICOMWEB_PLUGIN] if Path(DICOMWEB_PLUGIN).exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}"},
        "StableAge": 1,
        "SaveJobs": False,
        "HttpTimeout": 120,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, TCP_NODELAY="1")
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([tool("Orthanc"), *(["--verbose"] if verbose else []), str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
    orthanc = Orthanc(proc, http_port, dicom_port, aet, folder)
    try:
        wait_port(http_port, timeout=60)
        wait_for(lambda: _alive(orthanc), 60, what="Orthanc REST API")
    except Exception:
        orthanc.stop()
        raise
    return orthanc


def _alive(o: Orthanc) -> bool:
    if o.proc.poll() is not None:
        raise RuntimeError(f"Orthanc exited; see {o.folder / 'orthanc.log'}")
    try:
        return bool(o.get("/system"))
    except OSError:
        return False
