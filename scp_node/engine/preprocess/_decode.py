"""Reading the DICOM files of a series and decoding their stored pixel values.

Headers are read up front; pixel data is read from the file only for the frames that are used.
pydicom decodes first; GDCM is the fallback for the retired JPEG 12-bit processes pydicom lacks.
Decoding problems are raised as :class:`RuntimeError` with a PHI-free reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..result import SourceImageRef

#: The package's logger (``scp_node.engine.preprocess``), as before the split into modules.
log = logging.getLogger(__name__.rpartition(".")[0])

_DEFER_SIZE = "256 KB"  # pixel data is read from the file only for the slices that are used


@dataclass
class _Instance:
    """One readable DICOM file of the series (header read; pixel data loaded on demand)."""

    order: int  #: position in the input list
    path: Path
    ds: Dataset
    modality: str
    frames: int

    @property
    def instance_number(self) -> int | None:
        try:
            return int(self.ds.get("InstanceNumber"))
        except (TypeError, ValueError):
            return None

    @property
    def is_multiframe(self) -> bool:
        return self.frames > 1

    def source(self, frame_index: int) -> SourceImageRef:
        return SourceImageRef(
            sop_class_uid=str(self.ds.get("SOPClassUID", "")),
            sop_instance_uid=str(self.ds.get("SOPInstanceUID", "")),
            frame_number=frame_index + 1 if self.is_multiframe else None,
        )



def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _read_instances(paths: Sequence[Path]) -> tuple[list[_Instance], int]:
    """Read all headers; unreadable files are counted, not raised (one bad file must not sink a series)."""
    instances: list[_Instance] = []
    unreadable = 0
    for order, path in enumerate(paths):
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        except Exception as exc:  # noqa: BLE001 - any parse error of a received file is a data problem
            unreadable += 1
            log.warning("input file %d of the series is not readable DICOM (%s)", order + 1, type(exc).__name__)
            continue
        modality = str(ds.get("Modality", "") or "").strip().upper()
        instances.append(_Instance(order, Path(path), ds, modality, _number_of_frames(ds)))
    return instances, unreadable


_gdcm_quiet = False


def _decode_with_gdcm(path: Path, ds: Dataset) -> np.ndarray:
    """Decode with GDCM directly: it handles the retired JPEG 12-bit processes (4.53/4.55) pydicom lacks."""
    global _gdcm_quiet
    try:
        import gdcm  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("python-gdcm is not installed") from exc
    if not _gdcm_quiet:
        gdcm.Trace.WarningOff()
        gdcm.Trace.DebugOff()
        _gdcm_quiet = True
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError("GDCM could not read the file")
    image = reader.GetImage()
    pixel_format = image.GetPixelFormat()
    if pixel_format.GetSamplesPerPixel() != 1:
        raise RuntimeError("GDCM fallback handles monochrome images only")
    bits = pixel_format.GetBitsAllocated()
    signed = pixel_format.GetPixelRepresentation() == 1
    dtypes = {8: (np.uint8, np.int8), 16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}
    if bits not in dtypes:
        raise RuntimeError(f"GDCM fallback cannot handle {bits} bits allocated")
    buffer = image.GetBuffer()
    if not buffer:
        raise RuntimeError("GDCM returned no pixel data")
    raw = buffer.encode("utf-8", errors="surrogateescape") if isinstance(buffer, str) else bytes(buffer)
    arr = np.frombuffer(raw, dtype=dtypes[bits][int(signed)])
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = arr.size // (rows * columns)
    if frames < 1 or frames * rows * columns != arr.size:
        raise RuntimeError("GDCM returned pixel data of an unexpected size")
    return arr.reshape(frames, rows, columns)


def _transfer_syntax_text(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "unknown transfer syntax"
    return f"transfer syntax {uid.name} ({uid})" if uid.name != str(uid) else f"transfer syntax {uid}"


def _decode(instance: _Instance) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols); raises RuntimeError with a PHI-free reason."""
    ds = instance.ds
    try:
        arr = ds.pixel_array
    except Exception as first:  # noqa: BLE001 - decoders raise many types for bad or unsupported data
        try:
            arr = _decode_with_gdcm(instance.path, ds)
        except Exception:  # noqa: BLE001
            raise RuntimeError(
                f"pixel data cannot be decoded ({_transfer_syntax_text(ds)}: {type(first).__name__})"
            ) from first
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise RuntimeError(f"unexpected pixel array shape {arr.shape} for a monochrome image")
    return arr
