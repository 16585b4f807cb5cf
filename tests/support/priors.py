"""Studies of one made-up patient derived from a real chest X-ray: a current one and its priors.

Each copy keeps the real image and header and gets new Study/Series/SOP Instance UIDs, the
patient values the test names and a Study Date the test names (a year earlier, say), so the
node and Orthanc see what a PACS holds for a patient who came back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from .paths import CXR, need_data

#: A small real chest CR (Explicit VR LE, PA, CHEST) with no patient values of its own.
SOURCE_CXR = CXR / "CR-MONO1-10-chest_barre.dcm"
PATIENT_ID = "PRIOR-TEST-0001"


def derived_cxr(out: Path, *, study_date: str, study_time: str = "101500", patient_id: str = PATIENT_ID,
                birth_date: str = "19600101", sex: str = "F", source: Path = SOURCE_CXR,
                **overrides: Any) -> Path:
    """A copy of a real CXR as a new study of the given patient, written to ``out`` (a file).

    ``overrides``: other header keywords to set (ViewPosition="LL", IssuerOfPatientID=..., ...);
    a value of None deletes the element."""
    ds = pydicom.dcmread(need_data(source))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = patient_id, "PRIOR^TEST"
    ds.PatientBirthDate, ds.PatientSex = birth_date, sex
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = "A" + study_date
    ds.StudyID = "1"
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
