"""CR/DX (chest X-ray) pixel recipe: Modality LUT, then the image's own VOI LUT / window, MONOCHROME1
inverted, scaled to 8 bit, as a viewer would display the image.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from ._transform import window_to_uint8


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def xray_to_uint8(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """One CR/DX frame -> 8-bit values as a viewer would display them (bone bright, air dark).

    Modality LUT, then the VOI LUT or first window of the image; without either, the full stored
    bit depth is the range (MedGemma's DICOM handler does the same). MONOCHROME1 is inverted last.
    """
    values = apply_modality_lut(stored, ds)
    has_lut = bool(ds.get("VOILUTSequence")) and "LUTData" in ds.VOILUTSequence[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        out = apply_voi_lut(np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values, ds, index=0)
        low, high = float(lut.min()), float(lut.max())
    elif has_window:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        ends = apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), ds, index=0, prefer_lut=False)
        low, high = float(np.min(ends)), float(np.max(ends))
    else:
        out = values
        ends = apply_modality_lut(np.array(_stored_range(ds), dtype=np.int64), ds)
        low, high = float(np.min(ends)), float(np.max(ends))
    if high <= low:
        low, high = float(np.min(out)), float(np.max(out))
    pixels = window_to_uint8(out, low, high) if high > low else np.zeros(np.shape(out), dtype=np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels
