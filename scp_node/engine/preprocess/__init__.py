"""Turn one DICOM series (a list of files) into the RGB images MedGemma 1.5 expects.

Why these recipes: MedGemma 1.5 was trained on images prepared in specific ways, and the model is only
as good as the match between our input and its training input:

* CR/DX (chest X-ray): Modality LUT, then the image's own VOI LUT / window (without either, the
  image's own min-max, as Google's serving code rescales each CXR), MONOCHROME1 inverted,
  scaled to 8 bit, **zero-padded to a square** (split evenly on both sides, as in training and in the
  CXR localisation notebook) so the processor's resize to 896x896 keeps the aspect ratio.
* CT: Hounsfield units packed into R, G, B as three windows: [-1024, 1024] (wide), [-135, 215] (soft
  tissue), [0, 80] (brain); slices ordered head to foot along the slice normal; at most 85 slices,
  picked as Google's CT notebook picks them.
* MR: one min-max over the whole (sampled) volume, the same value in R, G and B.

Series that cannot be analysed raise :class:`SeriesSkipped` with a reason fit for an audit log; data
problems never escape as bare exceptions. Nothing here logs patient identifiers.

The work is split by job; import from this package, not from its private modules:

* ``_transform``: PadTransform, pad_to_square, windowing to 8 bit, resize to the model input;
* ``_decode``: reading the series' headers and decoding pixel data (pydicom, GDCM fallback);
* ``_xray``: the CR/DX recipe (Modality/VOI LUT, MONOCHROME1);
* ``_volume``: the CT/MR recipes (HU windows, min-max), slice ordering and sampling;
* ``_series``: PreparedSeries, SeriesSkipped / SeriesNotAnalysed, the skip rules and :func:`prepare_series`.
"""

from __future__ import annotations

# Standard-library and third-party names that the single-module version exposed; kept so that the
# package namespace (``dir()``) is unchanged by the split.
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from ..result import SourceImageRef
from ._decode import log
from ._series import (
    DEFAULT_CT_MAX_SLICES,
    DEFAULT_CT_MIN_SLICES,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MR_MAX_SLICES,
    DEFAULT_XRAY_MAX_IMAGES,
    SUPPORTED_MODALITIES,
    VOLUME_MODALITIES,
    XRAY_MODALITIES,
    PreparedSeries,
    NON_IMAGE_MODALITIES,
    SeriesNotAnalysed,
    SeriesSkipped,
    prepare_series,
    readable_body_part,
)
from ._transform import PadTransform, pad_to_square, window_to_uint8
from ._volume import (CT_WINDOWS, ct_hu_to_rgb, head_first_normal, minmax_to_uint8, order_frames, sample_indices,
                      slice_normal)
from ._xray import xray_to_uint8
