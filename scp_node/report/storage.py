"""Durable writing of SR files, checked by reading them back (MONAI Deploy convention).

Why read back: an SR that pydicom can write but nobody can parse would only be discovered at
the PACS. The file is parsed (pydicom and highdicom, including the TID 1500 content tree)
under its temporary name, and only then renamed into place, so a reader of the final path
sees either nothing or a complete, parseable file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pydicom
from highdicom.sr import Comprehensive3DSR, MeasurementReport
from pydicom.uid import ExplicitVRLittleEndian

from scp_node.store.files import fsync_dir, make_folder

logger = logging.getLogger(__name__)

#: mkstemp creates 0600; the exporter and operators read these files, so make them 0644.
_FILE_MODE = 0o644


def read_report(path: str | os.PathLike[str]) -> Comprehensive3DSR:
    """Read an SR written by :func:`write_report` and parse its TID 1500 content."""
    dataset = pydicom.dcmread(os.fspath(path))
    sr = Comprehensive3DSR.from_dataset(dataset, copy=False)
    if not isinstance(sr.content, MeasurementReport):
        raise ValueError(f"{path}: content is not a TID 1500 Measurement Report")
    return sr


def write_report(sr: Comprehensive3DSR, path: str | os.PathLike[str]) -> Path:
    """Write ``sr`` to ``path`` as Explicit VR Little Endian, durably, and verify it.

    Steps: write to a temporary file in the same directory, flush and fsync, read it back
    (SOP Instance UID must match, content must parse as TID 1500), rename over ``path``,
    fsync the directory. On any failure the temporary file is removed and the error raised;
    an existing file at ``path`` is left untouched.
    """
    target = Path(path)
    make_folder(target.parent)
    if sr.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError("SR must use Explicit VR Little Endian")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            sr.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        check = read_report(tmp)
        if str(check.SOPInstanceUID) != str(sr.SOPInstanceUID):
            raise ValueError("read-back SOP Instance UID differs from the written one")
        if check.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
            raise ValueError("read-back transfer syntax is not Explicit VR Little Endian")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    logger.info("wrote SR %s (%d bytes)", sr.SOPInstanceUID, target.stat().st_size)
    return target
