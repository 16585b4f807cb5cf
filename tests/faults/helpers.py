"""Shared helpers for the fault suite: counting the index, the files and the audit; DCMTK senders;
a TCP proxy that can stall or refuse (a slow or down PACS); series copies with new UIDs."""

from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable

import pydicom
from pydicom.uid import generate_uid

from tests.support.paths import tool


def db_path(folder: Path) -> Path:
    return folder / "index.db"


def query(folder: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db_path(folder), timeout=30) as con:
        return con.execute(sql, args).fetchall()


def indexed_sops(folder: Path) -> set[str]:
    return {r[0] for r in query(folder, "select sop_instance_uid from instances")}


def stored_files(folder: Path) -> list[Path]:
    """Every file under storage (temporary ones included: they must not remain)."""
    return [p for p in (folder / "storage").rglob("*") if p.is_file()]


def instance_counts(folder: Path) -> tuple[int, int]:
    """(indexed instances, instance files on disk); SRs and their sidecars are not instances."""
    sr_paths = {r[0] for r in query(folder, "select path from reports")} if db_path(folder).exists() else set()
    rows = query(folder, "select count(*) from instances")[0][0] if db_path(folder).exists() else 0
    files = [p for p in stored_files(folder)
             if p.relative_to(folder / "storage").as_posix() not in sr_paths and p.suffix != ".json"]
    return int(rows), len(files)


def events(folder: Path, name: str) -> list[tuple[str, str, str]]:
    return query(folder, "select outcome, ae_title, detail from audit_events where event = ? order by id", name)


def count_event(folder: Path, name: str) -> int:
    return len(events(folder, name))


def copy_series(files: Iterable[Path], out: Path) -> list[Path]:
    """Rewrite files with new Study/Series/SOP Instance UIDs (one new study), so a copy is new data."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    result = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        result.append(path)
    return result


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def storescu(port: int, files: list[Path], aet: str = "STORESCU", extra: list[str] | None = None,
             timeout: float = 300) -> subprocess.Popen[str]:
    """Start DCMTK storescu (-v, so each file's response is in its output)."""
    return subprocess.Popen([tool("storescu"), "-v", "-aet", aet, "-aec", "SCPNODE", *(extra or []),
                             "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def acknowledged(output: str) -> list[Path]:
    """Files storescu got a Success response for, from its -v log."""
    ok, current = [], None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) == "Success":
                ok.append(current)
            current = None
    return ok


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


class Proxy:
    """A TCP proxy in front of a PACS: ``forward`` (pass bytes), ``stall`` (accept, never answer),
    ``refuse`` (accept and close at once: the PACS is down)."""

    def __init__(self, target_port: int, mode: str = "forward", rate: float = 0.0) -> None:
        self.target_port = target_port
        self.rate = rate  # bytes/s client -> target when > 0 (a slow link)
        self.mode = mode
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.mode == "refuse":
                client.close()
            elif self.mode == "stall":
                self._held.append(client)
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return

        def pipe(a: socket.socket, b: socket.socket, rate: float = 0.0) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                    if rate:
                        time.sleep(len(data) / rate)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream, self.rate)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for s in self._held:
            s.close()


def set_keys(config: Path, section: str, **values: object) -> Path:
    """Add keys to a ``[section]`` of a config written by ``write_config`` (or append the section)."""
    import json

    lines = config.read_text().splitlines()
    new = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in values.items()]
    header = f"[{section}]"
    if header in lines:
        i = lines.index(header) + 1
        lines[i:i] = new
    else:
        lines += ["", header, *new]
    config.write_text("\n".join(lines) + "\n")
    return config


def orthanc_sr_instances(orthanc: "object") -> int:
    """How many SR instances the PACS holds (every SR series, every instance)."""
    total = 0
    for sid in orthanc.get("/series"):  # type: ignore[attr-defined]
        s = orthanc.get(f"/series/{sid}")  # type: ignore[attr-defined]
        if s["MainDicomTags"].get("Modality") == "SR":
            total += len(s["Instances"])
    return total
