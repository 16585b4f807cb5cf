"""Where the shared real DICOM data and the DCMTK/dicom3tools binaries are."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = (REPO.parent / "shared" / "data").resolve()
CXR = DATA / "xray_chest"
CT_DIR = DATA / "ct_chest_lidc0001" / "CT"
IN_CI = bool(os.environ.get("CI"))


def tool(name: str) -> str:
    """Absolute path of a Debian tool (DCMTK, dicom3tools, Orthanc): /usr/bin first, never a pip shim.

    In CI a missing tool fails the test; on a developer machine it skips with the apt package name.
    """
    for folder in ("/usr/bin", "/usr/sbin", "/bin"):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found and "pyenv" not in found and "/.venv/" not in found:
        return found
    msg = f"{name} not installed (apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError("unreachable")


def need_data(path: Path) -> Path:
    if not path.exists():
        msg = f"shared test data missing: {path}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def data_files(folder: Path, pattern: str = "*.dcm", at_least: int = 1) -> list[Path]:
    """The files of a shared data folder, sorted by name, at least ``at_least`` of them.

    The one rule for missing data: a missing folder, or one with fewer files than the test uses,
    fails in CI and skips elsewhere with the reason -- never an IndexError further on.
    """
    files = sorted(need_data(folder).glob(pattern))
    if len(files) < at_least:
        msg = f"shared test data incomplete: {folder} has {len(files)} {pattern} files, the test needs {at_least}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return files

