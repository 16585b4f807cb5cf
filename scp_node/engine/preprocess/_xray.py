"""CR/DX (chest X-ray) pixel recipe: Modality LUT, then the image's own VOI LUT / window, MONOCHROME1
inverted, scaled to 8 bit, as a viewer would display the image.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from ._transform import window_to_uint8


def xray_to_uint8(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """One CR/DX frame -> 8-bit values as a viewer would display them (bone bright, air dark).

    Modality LUT, then the VOI LUT or first window of the image; without either, the image's own
    minimum and maximum are the range: Google's serving code (Google-Health/medgemma
    ``python/data_accessors/local_file_handlers/generic_dicom_handler.py``, ``_norm_cxr_imaging``)
    rescales every CXR by its own dynamic range (``image_utils.rescale_dynamic_range``). A VOI LUT or
    window in the file still wins: it is how the image is meant to be shown. MONOCHROME1 is inverted last.
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
        low, high = float(np.min(out)), float(np.max(out))
    if high <= low:
        low, high = float(np.min(out)), float(np.max(out))
    pixels = window_to_uint8(out, low, high) if high > low else np.zeros(np.shape(out), dtype=np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels
