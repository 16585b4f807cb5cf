"""CT/MR volume recipes: slice geometry and ordering along the slice normal, even sampling of slices,
modality values (HU for CT), CT HU packed into three windows as RGB, MR min-max over the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from ._decode import _Instance
from ._transform import window_to_uint8

#: CT windows (low, high) in HU for the R, G and B channels (MedGemma 1.5 CT recipe).
CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))


def ct_hu_to_rgb(hu: np.ndarray) -> np.ndarray:
    """Pack one HU slice into RGB: R wide [-1024, 1024], G soft tissue [-135, 215], B brain [0, 80]."""
    hu = np.asarray(hu, dtype=np.float32)
    return np.stack([window_to_uint8(hu, low, high) for low, high in CT_WINDOWS], axis=-1)


def minmax_to_uint8(volume: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Scale all slices with one min and max taken over the whole volume (MedGemma's MR recipe).

    A constant volume becomes all 255, as in MedGemma's own DICOM handler.
    """
    low = min(float(np.min(s)) for s in volume)
    high = max(float(np.max(s)) for s in volume)
    if high <= low:
        return [np.full(np.shape(s), 255, dtype=np.uint8) for s in volume]
    scale = 255.0 / (high - low)
    return [np.rint((np.asarray(s, dtype=np.float32) - low) * scale).astype(np.uint8) for s in volume]


def sample_indices(count: int, max_count: int) -> list[int]:
    """At most ``max_count`` evenly spaced indices of ``range(count)``, picked as Google's CT notebook does.

    Google-Health/medgemma ``notebooks/high_dimensional_ct_hugging_face.ipynb`` samples 85 slices with
    ``instances[int(round(i / MAX_SLICE * (n - 1)))] for i in range(1, MAX_SLICE + 1)``: the steps start
    one step in (the first slice is left out when there are more than ``max_count``) and end on the
    last slice. Python's ``round`` (half to even) is used as there, so the same slices are picked.
    """
    if max_count < 1:
        raise ValueError("max_count must be at least 1")
    if count <= max_count:
        return list(range(count))
    return [int(round(i / max_count * (count - 1))) for i in range(1, max_count + 1)]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from Image Orientation (Patient) (row x column direction)."""
    values = np.asarray([float(v) for v in orientation], dtype=np.float64)
    normal = np.cross(values[:3], values[3:6])
    length = float(np.linalg.norm(normal))
    if length == 0.0:
        raise ValueError("degenerate Image Orientation (Patient)")
    return normal / length


def _functional_group_item(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """First item of a functional group macro for a frame (per-frame first, then shared)."""
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups is None or len(groups) <= index:
            continue
        macro = groups[index].get(keyword)
        if macro is not None and len(macro) > 0:
            return macro[0]
    return None


def _frame_geometry(ds: Dataset, frame_index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(Image Position (Patient), Image Orientation (Patient)) of a frame, from top level or functional groups."""
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if position is None:
        item = _functional_group_item(ds, frame_index, "PlanePositionSequence")
        position = item.get("ImagePositionPatient") if item is not None else None
    if orientation is None:
        item = _functional_group_item(ds, frame_index, "PlaneOrientationSequence")
        orientation = item.get("ImageOrientationPatient") if item is not None else None
    try:
        pos = np.asarray([float(v) for v in position], dtype=np.float64) if position is not None else None
        ori = np.asarray([float(v) for v in orientation], dtype=np.float64) if orientation is not None else None
    except (TypeError, ValueError):
        return None, None
    if pos is not None and pos.shape != (3,):
        pos = None
    if ori is not None and ori.shape != (6,):
        ori = None
    return pos, ori


def _modality_values(stored: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    """Stored values -> modality values (HU for CT); enhanced objects keep rescale in functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    item = _functional_group_item(ds, frame_index, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item:
        slope = float(item.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
        return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return stored.astype(np.float32)



@dataclass
class _Frame:
    instance: _Instance
    frame_index: int
    position: np.ndarray | None
    orientation: np.ndarray | None


def head_first_normal(normal: np.ndarray) -> tuple[np.ndarray, bool]:
    """The slice normal with its sign fixed, and whether positions along it are read descending.

    DICOM patient coordinates are LPS: +x towards the patient's left, +y posterior, +z superior
    (head). The normal's dominant axis decides the reading order: axial (z) slices go head to foot
    (superior first, so *descending* along +z), sagittal (x) right to left, coronal (y) anterior to
    posterior (both ascending). The sign of the normal (row x column direction) differs between
    scanners; fixing it makes the order depend on where the slices are, not on how they were encoded.
    """
    axis = int(np.argmax(np.abs(normal)))
    fixed = normal if normal[axis] >= 0 else -normal
    return fixed, axis == 2


def order_frames(frames: list[_Frame]) -> tuple[list[_Frame], str]:
    """Sort slices head to foot by position: Image Position (Patient) projected on the slice normal.

    Axial slices come superior first (sagittal right to left, coronal anterior to posterior, see
    :func:`head_first_normal`), whatever the Instance Numbers say (missing, shuffled or reversed).
    Falls back to Instance Number only when positions or orientations are missing, then to input
    order. Returns the ordered frames and how they were ordered (for the notes).
    """
    normal = None
    for frame in frames:
        if frame.orientation is not None:
            try:
                normal = slice_normal(frame.orientation)
                break
            except ValueError:
                continue
    if normal is not None and all(f.position is not None for f in frames):
        normal, descending = head_first_normal(normal)
        sign = -1.0 if descending else 1.0
        keyed = sorted(
            frames,
            key=lambda f: (
                sign * float(np.dot(f.position, normal)),  # type: ignore[arg-type]
                f.instance.instance_number or 0,
                f.frame_index,
                f.instance.order,
            ),
        )
        return keyed, "position"
    if all(f.instance.instance_number is not None for f in frames):
        return sorted(frames, key=lambda f: (f.instance.instance_number, f.frame_index, f.instance.order)), "instance number"
    return sorted(frames, key=lambda f: (f.instance.order, f.frame_index)), "input order"


def _volume_frames(instances: list[_Instance]) -> list[_Frame]:
    frames: list[_Frame] = []
    for instance in instances:
        for frame_index in range(instance.frames):
            position, orientation = _frame_geometry(instance.ds, frame_index)
            frames.append(_Frame(instance, frame_index, position, orientation))
    return frames
