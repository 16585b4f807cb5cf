"""Real DICOM files from the shared data set (read by path, never copied) and small helpers."""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select

from scp_node.store.db import Database
from scp_node.store.ingest import Origin
from tests.support.paths import CT_DIR, CXR, DATA, need_data

#: Real files from the shared data set (read by path, never copied into the repo).
CXR_UNCR = CXR / "RG1_UNCR.dcm"  # Philips CR, Explicit VR LE, PatientID 9RG1
CXR_DX_J2K = CXR / "DX_chest_canon_966_fixed_J2KR.dcm"  # Canon DX, JPEG 2000 lossless
CT_SLICES = [CT_DIR / f"{i:06d}.dcm" for i in range(1, 9)]  # LIDC-IDRI-0001 chest CT
CT_PATIENT_ID = "LIDC-IDRI-0001"
TS_CT = DATA / "ts_matrix" / "cornerstone_ct"
#: Same SOP Instance UID, different bytes (two uncompressed encodings of one GE CT slice).
TS_CT_EXPLICIT = TS_CT / "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
TS_CT_IMPLICIT = TS_CT / "CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm"
SMALL_MR = DATA / "ts_matrix" / "d2n_mr4" / "compressed_rle" / "IM-0001-0001-0001.dcm"

ORIGIN = Origin(ae_title="STORESCU", address="10.1.2.3", via="dimse")


def read_bytes(path: Path) -> bytes:
    return need_data(path).read_bytes()


def rewritten(path: Path, **attrs: Any) -> bytes:
    """The file at ``path`` re-encoded with some attributes changed (value ``None`` deletes it).

    Changing SOPInstanceUID also changes MediaStorageSOPInstanceUID, as a sender would.
    """
    ds = pydicom.dcmread(need_data(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs on purpose
        for keyword, value in attrs.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID" and value:
                    ds.file_meta.MediaStorageSOPInstanceUID = value
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


