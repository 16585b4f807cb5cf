"""Turn one DICOM series (a list of files) into the RGB images MedGemma 1.5 expects.

Why these recipes: MedGemma 1.5 was trained on images prepared in specific ways, and the model is only
as good as the match between our input and its training input:

* CR/DX (chest X-ray): Modality LUT, then the image's own VOI LUT / window, MONOCHROME1 inverted,
  scaled to 8 bit, **zero-padded to a square** (split evenly on both sides, as in training and in the
  CXR localisation notebook) so the processor's resize to 896x896 keeps the aspect ratio.
* CT: Hounsfield units packed into R, G, B as three windows: [-1024, 1024] (wide), [-135, 215] (soft
  tissue), [0, 80] (brain); slices ordered along the slice normal; at most 85 evenly spaced slices.
* MR: one min-max over the whole (sampled) volume, the same value in R, G and B.

Series that cannot be analysed raise :class:`SeriesSkipped` with a reason fit for an audit log; data
problems never escape as bare exceptions. Nothing here logs patient identifiers.
"""

from __future__ import annotations

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

from .result import SourceImageRef

log = logging.getLogger(__name__)

#: CT windows (low, high) in HU for the R, G and B channels (MedGemma 1.5 CT recipe).
CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
#: MedGemma 1.5 was trained with at most 85 slices per volume (85 x 256 image tokens stays under 32k).
DEFAULT_CT_MAX_SLICES = 85
DEFAULT_MR_MAX_SLICES = 85
#: MedGemma 1.5's volume training data had at least five slices; fewer is not a volume to it.
DEFAULT_CT_MIN_SLICES = 5
#: More CR/DX images than this in one series are not a single study view set; keep the first ones.
DEFAULT_XRAY_MAX_IMAGES = 4
#: Side of the square image the Gemma 3 image processor feeds to SigLIP.
DEFAULT_IMAGE_SIZE = 896

XRAY_MODALITIES = frozenset({"CR", "DX"})
VOLUME_MODALITIES = frozenset({"CT", "MR"})
SUPPORTED_MODALITIES = XRAY_MODALITIES | VOLUME_MODALITIES

_DEFER_SIZE = "256 KB"  # pixel data is read from the file only for the slices that are used
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_READABLE_BODY_PARTS = {
    "ABDOMENPELVIS": "abdomen and pelvis",
    "CHESTABDOMEN": "chest and abdomen",
    "CHESTABDPELVIS": "chest, abdomen and pelvis",
    "CSPINE": "cervical spine",
    "TSPINE": "thoracic spine",
    "LSPINE": "lumbar spine",
    "HEADNECK": "head and neck",
    "WHOLEBODY": "whole body",
}


class SeriesSkipped(Exception):
    """The series cannot be analysed; ``reason`` is a short, PHI-free explanation for the audit log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PadTransform:
    """How a source image was placed in the zero-padded square that the model saw.

    MedGemma 1.5 answers localisation prompts with boxes ``[y0, x0, y1, x1]`` on a 0-1000 grid over
    the *square* model input. The SR must reference pixels of the *source* image, so we keep the
    offsets needed to map back. Source coordinates are (row, column) in pixels, 0 at the top-left edge.
    Resizing the square (to 896) does not matter: the grid is relative to the square.
    """

    rows: int  #: source Rows
    columns: int  #: source Columns
    offset_y: int  #: zero rows added above the image
    offset_x: int  #: zero columns added left of the image
    square_size: int  #: side of the padded square, in source pixels

    @classmethod
    def for_shape(cls, rows: int, columns: int) -> "PadTransform":
        """Centre a rows x columns image in a square, splitting the padding evenly (extra pixel after)."""
        size = max(rows, columns)
        return cls(rows, columns, (size - rows) // 2, (size - columns) // 2, size)

    def grid_point_to_source(self, y: float, x: float, grid: float = 1000.0) -> tuple[float, float]:
        """Map a point on the 0..grid square grid to source (row, column), clipped to the image."""
        row = y / grid * self.square_size - self.offset_y
        col = x / grid * self.square_size - self.offset_x
        return (min(max(row, 0.0), float(self.rows)), min(max(col, 0.0), float(self.columns)))

    def grid_box_to_source(
        self, box: Sequence[float], grid: float = 1000.0
    ) -> tuple[float, float, float, float]:
        """Map a grid box ``[y0, x0, y1, x1]`` to source ``(row0, col0, row1, col1)``.

        Corners are put in order (row0 <= row1, col0 <= col1) and clipped to the image, so a box that
        lies wholly in the padding comes back with zero height or width; callers should drop those.
        """
        if len(box) != 4:
            raise ValueError(f"a box needs 4 numbers [y0, x0, y1, x1], got {len(box)}")
        y0, x0, y1, x1 = (float(v) for v in box)
        r0, c0 = self.grid_point_to_source(min(y0, y1), min(x0, x1), grid)
        r1, c1 = self.grid_point_to_source(max(y0, y1), max(x0, x1), grid)
        return (r0, c0, r1, c1)

    def source_box_to_grid(
        self, box: Sequence[float], grid: float = 1000.0
    ) -> tuple[float, float, float, float]:
        """Inverse of :meth:`grid_box_to_source` for boxes inside the image (for overlays and tests)."""
        r0, c0, r1, c1 = (float(v) for v in box)
        scale = grid / self.square_size
        return (
            (r0 + self.offset_y) * scale,
            (c0 + self.offset_x) * scale,
            (r1 + self.offset_y) * scale,
            (c1 + self.offset_x) * scale,
        )


@dataclass
class PreparedSeries:
    """Model-ready images of one series, with where each image came from."""

    modality: str
    body_part: str  #: BodyPartExamined as sent ("" when absent)
    images: list[Image.Image]  #: RGB, square; resized to the model's input size unless asked not to
    labels: list[str]  #: "SLICE k" (CT/MR) or "IMAGE k" (CR/DX), 1-based, one per image
    sources: list[SourceImageRef]  #: one per image, in model input order
    transforms: list[PadTransform]  #: one per image
    notes: list[str] = field(default_factory=list)  #: PHI-free remarks (sampling, dropped images)

    @property
    def is_volume(self) -> bool:
        """True for CT/MR, whose images are slices of one volume."""
        return self.modality in VOLUME_MODALITIES


# --------------------------------------------------------------------------------------------------
# Pure pixel functions (no DICOM), unit-tested on synthetic arrays
# --------------------------------------------------------------------------------------------------


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map linearly onto 0..255, rounding to the nearest level."""
    scaled = (np.clip(np.asarray(values, dtype=np.float32), low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


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


def pad_to_square(pixels: np.ndarray) -> tuple[np.ndarray, PadTransform]:
    """Zero-pad a (rows, cols) or (rows, cols, channels) array to a centred square."""
    rows, columns = pixels.shape[:2]
    transform = PadTransform.for_shape(rows, columns)
    if rows == columns:
        return pixels, transform
    size = transform.square_size
    out = np.zeros((size, size) + pixels.shape[2:], dtype=pixels.dtype)
    out[transform.offset_y : transform.offset_y + rows, transform.offset_x : transform.offset_x + columns] = pixels
    return out, transform


def sample_indices(count: int, max_count: int) -> list[int]:
    """At most ``max_count`` evenly spaced indices of ``range(count)``, always keeping first and last."""
    if max_count < 1:
        raise ValueError("max_count must be at least 1")
    if count <= max_count:
        return list(range(count))
    if max_count == 1:
        return [0]
    return [int(i) for i in np.unique(np.rint(np.linspace(0, count - 1, max_count)).astype(int))]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from Image Orientation (Patient) (row x column direction)."""
    values = np.asarray([float(v) for v in orientation], dtype=np.float64)
    normal = np.cross(values[:3], values[3:6])
    length = float(np.linalg.norm(normal))
    if length == 0.0:
        raise ValueError("degenerate Image Orientation (Patient)")
    return normal / length


def _to_image(pixels: np.ndarray, image_size: int | None) -> Image.Image:
    """uint8 gray or RGB array -> RGB PIL image, resized like the Gemma 3 processor would (bilinear).

    Resizing here instead of in the processor gives the same pixels (both use PIL bilinear on uint8)
    and halves the processor's time for an 85-slice CT.
    """
    image = Image.fromarray(np.ascontiguousarray(pixels))  # uint8: "L" for 2-D, "RGB" for (rows, cols, 3)
    if image_size and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# DICOM reading and decoding
# --------------------------------------------------------------------------------------------------


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


def _image_type(ds: Dataset) -> list[str]:
    """Image Type values upper-cased; tolerates a single string with spaces or backslashes."""
    value = ds.get("ImageType")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out.extend(part for part in str(item).upper().replace("\\", " ").split() if part)
    return out


def _is_sr(ds: Dataset) -> bool:
    name = getattr(ds.get("SOPClassUID"), "name", "") or ""
    return str(ds.get("Modality", "")).upper() == "SR" or name.endswith("SR Storage") or "SR" in name.split()


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


# --------------------------------------------------------------------------------------------------
# CR/DX
# --------------------------------------------------------------------------------------------------


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


def _prepare_xray(instances: list[_Instance], image_size: int | None, max_images: int) -> PreparedSeries:
    ordered = sorted(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.order))
    images: list[Image.Image] = []
    sources: list[SourceImageRef] = []
    transforms: list[PadTransform] = []
    notes: list[str] = []
    failures: list[str] = []
    for instance in ordered:
        if len(images) >= max_images:
            notes.append(f"used the first {max_images} CR/DX images of the series")
            break
        try:
            frames = _decode(instance)
        except RuntimeError as exc:
            failures.append(str(exc))
            continue
        for frame_index in range(frames.shape[0]):
            if len(images) >= max_images:
                break
            pixels, transform = pad_to_square(xray_to_uint8(frames[frame_index], instance.ds))
            images.append(_to_image(pixels, image_size))
            sources.append(instance.source(frame_index))
            transforms.append(transform)
    if not images:
        raise SeriesSkipped(failures[0] if failures else "no CR/DX image could be prepared")
    if failures:
        notes.append(f"{len(failures)} image(s) could not be decoded and were left out")
    return PreparedSeries(
        modality=ordered[0].modality,
        body_part=_body_part(ordered),
        images=images,
        labels=[f"IMAGE {k}" for k in range(1, len(images) + 1)],
        sources=sources,
        transforms=transforms,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# CT/MR volumes
# --------------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    instance: _Instance
    frame_index: int
    position: np.ndarray | None
    orientation: np.ndarray | None


def order_frames(frames: list[_Frame]) -> tuple[list[_Frame], str]:
    """Sort slices along the slice normal (Image Position projected on the Image Orientation normal).

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
        keyed = sorted(
            frames,
            key=lambda f: (
                float(np.dot(f.position, normal)),  # type: ignore[arg-type]
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


def _prepare_volume(
    instances: list[_Instance], modality: str, image_size: int | None, max_slices: int, min_slices: int
) -> PreparedSeries:
    frames = _volume_frames(instances)
    if len(frames) < min_slices:
        raise SeriesSkipped(
            f"{modality} series has {len(frames)} image(s); at least {min_slices} slices are needed for a volume"
        )
    ordered, how = order_frames(frames)
    chosen = [ordered[i] for i in sample_indices(len(ordered), max_slices)]
    notes = []
    if how != "position":
        notes.append(f"slices ordered by {how} (no complete Image Position/Orientation)")
    if len(chosen) < len(ordered):
        notes.append(f"sampled {len(chosen)} of {len(ordered)} slices evenly along the volume")

    decoded: dict[int, np.ndarray] = {}
    values: list[np.ndarray] = []
    used: list[_Frame] = []
    failures: list[str] = []
    for frame in chosen:
        key = id(frame.instance)
        if key not in decoded:
            try:
                decoded[key] = _decode(frame.instance)
            except RuntimeError as exc:
                failures.append(str(exc))
                decoded[key] = np.empty((0, 0, 0))
        stored = decoded[key]
        if frame.frame_index >= stored.shape[0]:
            continue
        values.append(_modality_values(stored[frame.frame_index], frame.instance.ds, frame.frame_index))
        used.append(frame)
        if not frame.instance.is_multiframe:
            decoded.pop(key, None)  # single-frame: free as we go
    if len(used) < min(min_slices, len(chosen)) or not used:
        reason = failures[0] if failures else "no slice could be decoded"
        raise SeriesSkipped(f"{modality} series: {reason}")
    if failures:
        notes.append(f"{len(chosen) - len(used)} slice(s) could not be decoded and were left out")

    if modality == "CT":
        pixel_slices = [ct_hu_to_rgb(v) for v in values]
    else:
        pixel_slices = minmax_to_uint8(values)
    images: list[Image.Image] = []
    transforms: list[PadTransform] = []
    for pixels in pixel_slices:
        padded, transform = pad_to_square(pixels)
        images.append(_to_image(padded, image_size))
        transforms.append(transform)
    return PreparedSeries(
        modality=modality,
        body_part=_body_part([f.instance for f in used]),
        images=images,
        labels=[f"SLICE {k}" for k in range(1, len(images) + 1)],
        sources=[f.instance.source(f.frame_index) for f in used],
        transforms=transforms,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Series level
# --------------------------------------------------------------------------------------------------


def _body_part(instances: Sequence[_Instance]) -> str:
    for instance in instances:
        value = str(instance.ds.get("BodyPartExamined", "") or "").strip()
        if value:
            return value
    return ""


def readable_body_part(body_part: str) -> str:
    """BodyPartExamined code -> words for a prompt ("CHEST" -> "chest"); letters and spaces only."""
    code = "".join(ch for ch in body_part.upper() if ch.isalnum() or ch == " ").strip()
    return _READABLE_BODY_PARTS.get(code.replace(" ", ""), code.lower())


def _skip_reason_without_images(instances: list[_Instance]) -> str:
    if all(_is_sr(i.ds) for i in instances):
        return "series holds only Structured Reports (no pixel data to analyse)"
    modalities = sorted({i.modality or "?" for i in instances})
    return f"series has no pixel data (modality {', '.join(modalities)})"


def prepare_series(
    paths: Sequence[Path | str],
    *,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    ct_max_slices: int = DEFAULT_CT_MAX_SLICES,
    mr_max_slices: int = DEFAULT_MR_MAX_SLICES,
    ct_min_slices: int = DEFAULT_CT_MIN_SLICES,
    xray_max_images: int = DEFAULT_XRAY_MAX_IMAGES,
) -> PreparedSeries:
    """Read a series and build the model input images following MedGemma 1.5's recipes.

    ``paths`` are the files of one series in any order. ``image_size`` is the processor's square input
    side (896); ``None`` keeps the padded source resolution. Raises :class:`SeriesSkipped` when the
    series cannot be analysed.
    """
    if not paths:
        raise SeriesSkipped("series has no files")
    instances, unreadable = _read_instances([Path(p) for p in paths])
    if not instances:
        raise SeriesSkipped(f"none of the {len(paths)} file(s) is readable DICOM")

    with_pixels = [i for i in instances if any(k in i.ds for k in _PIXEL_KEYWORDS)]
    if not with_pixels:
        raise SeriesSkipped(_skip_reason_without_images(instances))
    if all("PixelData" not in i.ds for i in with_pixels):
        raise SeriesSkipped("float pixel data (parametric maps) is not supported")
    with_pixels = [i for i in with_pixels if "PixelData" in i.ds]

    modality = Counter(i.modality for i in with_pixels).most_common(1)[0][0]
    if modality not in SUPPORTED_MODALITIES:
        what = "ultrasound (US)" if modality == "US" else f"modality {modality or '(none)'}"
        raise SeriesSkipped(f"{what} is not supported; supported modalities are CR, DX, CT and MR")
    candidates = [i for i in with_pixels if i.modality == modality]
    notes: list[str] = []
    if unreadable:
        notes.append(f"{unreadable} unreadable file(s) ignored")
    if len(candidates) < len(with_pixels):
        notes.append(f"{len(with_pixels) - len(candidates)} image(s) of another modality ignored")

    monochrome = [
        i
        for i in candidates
        if int(i.ds.get("SamplesPerPixel", 1) or 1) == 1
        and str(i.ds.get("PhotometricInterpretation", "")).strip().upper() in ("MONOCHROME1", "MONOCHROME2")
    ]
    if not monochrome:
        photometric = str(candidates[0].ds.get("PhotometricInterpretation", "?")).strip()
        raise SeriesSkipped(f"colour images ({photometric}) are not supported for {modality}")
    if len(monochrome) < len(candidates):
        notes.append(f"{len(candidates) - len(monochrome)} colour image(s) ignored")

    usable = [i for i in monochrome if "LOCALIZER" not in _image_type(i.ds)]
    if not usable:
        raise SeriesSkipped("series holds only localiser (LOCALIZER) images")
    if len(usable) < len(monochrome):
        notes.append(f"{len(monochrome) - len(usable)} localiser image(s) ignored")

    if modality in XRAY_MODALITIES:
        presentable = [i for i in usable if "For Processing" not in (getattr(i.ds.get("SOPClassUID"), "name", "") or "")]
        if not presentable:
            raise SeriesSkipped("DX 'For Processing' images are raw detector data, not for presentation")
        prepared = _prepare_xray(presentable, image_size, xray_max_images)
    elif modality == "CT":
        prepared = _prepare_volume(usable, "CT", image_size, ct_max_slices, ct_min_slices)
    else:
        prepared = _prepare_volume(usable, "MR", image_size, mr_max_slices, 1)
    prepared.notes = notes + prepared.notes
    log.info(
        "prepared %s series: %d image(s) from %d file(s)%s",
        prepared.modality,
        len(prepared.images),
        len(paths),
        f" ({'; '.join(prepared.notes)})" if prepared.notes else "",
    )
    return prepared
