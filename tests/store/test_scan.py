"""The quick structural scan against pydicom's full parse, on every real file we have."""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp_node.store.integrity import IncompleteDataset, check_complete
from scp_node.store.ingest import InvalidInstance, parse_header
from scp_node.store.scan import INDEXED_TAGS, scan_instance
from tests.support.paths import CT_DIR, DATA, data_files, need_data

KEYWORDS = [pydicom.datadict.keyword_for_tag(t) for t in sorted(INDEXED_TAGS)]


def _files() -> list[Path]:
    files = sorted(need_data(DATA).rglob("*.dcm"))
    # every folder, but not all 133 slices of a series: two of each folder
    seen: dict[Path, int] = {}
    picked = []
    for f in files:
        seen[f.parent] = seen.get(f.parent, 0) + 1
        if seen[f.parent] <= 2:
            picked.append(f)
    return picked


def _values(ds: pydicom.Dataset) -> dict[str, str]:
    return {kw: str(ds.get(kw, "")) for kw in KEYWORDS}


def test_scan_reads_what_pydicom_reads_on_real_files() -> None:
    scanned = fallback = 0
    for path in _files():
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not a Part 10 file pydicom reads: the scan must not either
                expected = None
            try:
                ds = scan_instance(data)
            except IncompleteDataset:
                pytest.fail(f"{path}: a whole file reported as truncated")
        if ds is None:
            fallback += 1
            continue
        assert expected is not None, path
        scanned += 1
        assert _values(ds) == _values(expected), path
        assert ds.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID, path
        assert ds.file_meta.get("MediaStorageSOPInstanceUID") == expected.file_meta.get("MediaStorageSOPInstanceUID"), path
    assert scanned >= 40, (scanned, fallback)  # the scan is the common path, not the exception


def test_character_sets_decode_as_pydicom_decodes_them() -> None:
    """pydicom's character set files (Japanese, Korean, Greek, Arabic, ISO 2022 escapes, several
    character sets at once): every indexed value reads the same as pydicom reads it; the
    non-ASCII names went through pydicom's own decoding."""
    folder = Path(pydicom.__file__).parent / "data" / "charset_files"
    checked = non_ascii = 0
    for path in sorted(folder.glob("chr*.dcm")):
        data = path.read_bytes()
        ds = scan_instance(data)
        if ds is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            assert _values(ds) == _values(expected), path
        checked += 1
        non_ascii += not str(ds.get("PatientName", "")).isascii()
    assert checked >= 15 and non_ascii >= 10, (checked, non_ascii)


def test_plain_values_are_read_without_pydicom() -> None:
    """The common case -- ASCII values -- never builds pydicom's data set (the point of the scan);
    Instance Number reads as pydicom's IS does."""
    path = data_files(CT_DIR)[0]
    data = path.read_bytes()
    ds = scan_instance(data)
    assert ds is not None
    expected = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    assert _values(ds) == _values(expected)
    assert ds._dataset is None  # nothing fell back to pydicom
    assert int(ds.get("InstanceNumber")) == int(expected.InstanceNumber)
    assert ds.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
    assert ds.get("NotIndexed", "default") == "default"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "reportsi.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
                                  "SC_rgb_rle.dcm", "MR_small_implicit.dcm"])
def test_every_cut_pydicom_refuses_is_refused(name: str) -> None:
    """Cut anywhere inside the data set: whatever pydicom's whole parse finds cut short, the scan
    refuses too.  (A cut exactly between two elements leaves a shorter whole data set: nobody can
    tell, pydicom neither.)"""
    data = Path(get_testdata_file(name)).read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    assert parse_header(data) is not None
    step = max(1, (len(data) - meta_end) // 80)
    refused = 0
    for cut in list(range(meta_end + 1, len(data), step)) + [len(data) - 1, len(data) - 2]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                check_complete(data[:cut])
            except Exception:  # noqa: BLE001 - pydicom refuses this cut
                with pytest.raises(InvalidInstance):
                    parse_header(data[:cut])
                refused += 1
    assert refused >= 20


def test_scan_and_pydicom_agree_on_truncation() -> None:
    """Where the scan decides, pydicom's parse decides the same; elsewhere the scan defers to it."""
    decided = 0
    for name in ("rtplan.dcm", "CT_small.dcm", "JPEG2000.dcm"):  # nested sequences; native; encapsulated
        data = Path(get_testdata_file(name)).read_bytes()
        for cut in range(len(data) - 600, len(data) - 1, 5):
            short = data[:cut]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = scan_instance(short)
                except IncompleteDataset:
                    with pytest.raises(Exception):  # noqa: B017 - pydicom refuses it too, in its own words
                        check_complete(short)
                    decided += 1
                    continue
                if ds is not None:
                    check_complete(short)  # whole for pydicom as well (a cut between two elements)
                    decided += 1
    assert decided > 100
