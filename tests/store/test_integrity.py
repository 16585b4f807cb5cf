"""Truncation check: every real file passes, cut-short files do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from scp_node.store.ingest import InvalidInstance, parse_header
from scp_node.store.integrity import IncompleteDataset, check_complete
from tests.store.realdata import CT_SLICES, CXR_DX_J2K, TS_CT
from tests.support.paths import DATA, need_data


def real_dicom_files() -> list[Path]:
    need_data(DATA)
    return sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix == ".dcm"
                  or (p.parent.name == "CT" and p.is_file()))


def test_no_real_file_is_called_incomplete() -> None:
    files = real_dicom_files()
    assert len(files) > 300
    refused = []
    for p in files:
        try:
            check_complete(p.read_bytes())
        except Exception as exc:  # noqa: BLE001 - listed in the assertion
            refused.append(f"{p.relative_to(DATA)}: {exc}")
    assert refused == []


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_pydicom_truncated_samples_are_refused(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    with pytest.raises(IncompleteDataset, match="truncated"):
        check_complete(data)
    with pytest.raises(InvalidInstance, match="incomplete dataset"):
        parse_header(data)


@pytest.mark.parametrize("path", [CT_SLICES[0], CXR_DX_J2K,
                                  TS_CT / "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
                                  TS_CT / "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm"])
def test_cut_inside_the_pixel_data_is_refused(path: Path) -> None:
    data = need_data(path).read_bytes()
    for cut in (1, 2, 7, 8, 100, len(data) // 3):
        with pytest.raises(InvalidInstance):
            parse_header(data[:-cut])
