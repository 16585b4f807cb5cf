"""Series level: which images of a series are analysed (skip rules), and how the CR/DX and CT/MR
recipes turn them into a :class:`PreparedSeries`.

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
from PIL import Image
from pydicom.dataset import Dataset

from ..result import SourceImageRef
from ._decode import _decode, _Instance, _read_instances
from ._transform import PadTransform, _to_image, pad_to_square
from ._volume import _Frame, _modality_values, _volume_frames, ct_hu_to_rgb, minmax_to_uint8, order_frames, sample_indices
from ._xray import xray_to_uint8

#: The package's logger (``scp_node.engine.preprocess``), as before the split into modules.
log = logging.getLogger(__name__.rpartition(".")[0])

#: MedGemma 1.5 was trained with at most 85 slices per volume (85 x 256 image tokens stays under 32k).
DEFAULT_CT_MAX_SLICES = 85
DEFAULT_MR_MAX_SLICES = 85
#: MedGemma 1.5's volume training data had at least five slices; fewer is not a volume to it.
DEFAULT_CT_MIN_SLICES = 5
#: More CR/DX images than this in one series are not a single study view set; keep the first ones.
DEFAULT_XRAY_MAX_IMAGES = 4
#: Side of the square image the Gemma 3 image processor feeds to SigLIP.
DEFAULT_IMAGE_SIZE = 896

#: Objects that are not images to read: a series of these is skipped silently.
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                                  "DOC", "AU", "ECG", "HD", "FID", "PLAN", "RWV"})
XRAY_MODALITIES = frozenset({"CR", "DX"})
VOLUME_MODALITIES = frozenset({"CT", "MR"})
SUPPORTED_MODALITIES = XRAY_MODALITIES | VOLUME_MODALITIES

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
    """Nothing to analyse (no pixel data, a Structured Report, a presentation state, a key object,
    a segmentation, raw detector data); ``reason`` is a short, PHI-free explanation for the audit log.
    The node skips such a series silently (an audit row, no SR)."""

    #: Whether the radiologist should be told (a "not analysed" SR when [report] notify_not_analysed).
    notify = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SeriesNotAnalysed(SeriesSkipped):
    """A series of images the engine cannot analyse (unsupported photometric interpretation or
    modality, undecodable pixels, too long for the model): its reason goes into the audit, into
    ``scp-node status`` and, when configured, into a short SR, so nobody is left guessing."""

    notify = True



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
    #: CT/MR read as 2D images (a slice, a scout, fewer slices than a volume needs), not as a volume
    as_images: bool = False

    @property
    def is_volume(self) -> bool:
        """True for CT/MR, whose images are slices of one volume."""
        return self.modality in VOLUME_MODALITIES


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
        raise SeriesNotAnalysed(failures[0] if failures else "no CR/DX image could be prepared")
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


def _prepare_volume(
    instances: list[_Instance], modality: str, image_size: int | None, max_slices: int, min_slices: int
) -> PreparedSeries:
    frames = _volume_frames(instances)
    ordered, how = order_frames(frames)
    chosen = [ordered[i] for i in sample_indices(len(ordered), max_slices)]
    notes = []
    as_images = len(frames) < min_slices
    if as_images:
        # MedGemma reads single CT and MR slices too: fewer slices than a volume are 2D images.
        notes.append(f"{len(frames)} image(s), fewer than the {min_slices} of a volume: read as 2D images")
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
        raise SeriesNotAnalysed(f"{modality} series: {reason}")
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
        as_images=as_images,
    )


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
        raise SeriesNotAnalysed("float pixel data (parametric maps) is not supported")
    with_pixels = [i for i in with_pixels if "PixelData" in i.ds]

    modality = Counter(i.modality for i in with_pixels).most_common(1)[0][0]
    if modality not in SUPPORTED_MODALITIES:
        what = "ultrasound (US)" if modality == "US" else f"modality {modality or '(none)'}"
        reason = f"{what} is not supported; supported modalities are CR, DX, CT and MR"
        if modality in NON_IMAGE_MODALITIES:
            raise SeriesSkipped(reason)
        raise SeriesNotAnalysed(reason)
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
        raise SeriesNotAnalysed(f"colour images ({photometric}) are not supported for {modality}")
    if len(monochrome) < len(candidates):
        notes.append(f"{len(candidates) - len(monochrome)} colour image(s) ignored")

    usable = [i for i in monochrome if "LOCALIZER" not in _image_type(i.ds)]
    if not usable:
        usable = monochrome  # a scout series: its localisers are the images (read as 2D images)
        notes.append("series holds only localiser (LOCALIZER) images")
    elif len(usable) < len(monochrome):
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
