"""WADO-RS frames and bulk data: what a viewer (OHIF's cornerstone loader) fetches to draw images.

``GET .../instances/{i}/frames/{n[,m...]}`` serves pixel data frames and
``GET .../instances/{i}/bulkdata/{path}`` the bulk data the metadata names by BulkDataURI.

Which bytes, in which transfer syntax (PS3.18 8.7.3), chosen from the request's Accept:

* a compressed stored frame is sent byte for byte (that frame's encapsulated fragments) to a
  client that accepts the stored syntax: ``transfer-syntax=*``, the stored UID, or the image
  media type of that syntax (``image/jpeg``, ``image/jls``, ``image/jp2``...);
* native (uncompressed) pixel data is sent as little-endian bytes, labelled Explicit VR Little
  Endian (the PS3.18 default of ``application/octet-stream``); Implicit and Explicit VR Little
  Endian share those bytes, a Deflated file's pixel data is the same once inflated, and a Big
  Endian file's words are swapped;
* a client that accepts only uncompressed frames gets a compressed stored frame decoded
  (pydicom with pylibjpeg/GDCM), for monochrome, palette and RGB images: the pixel values the
  compressed frame encodes, in the syntax the label names;
* anything else is 406: a frame is never sent labelled with a syntax its bytes are not in.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from starlette.requests import Request
from starlette.responses import Response

from .catalog import Record
from .media import MULTIPART_RELATED, DicomJSONResponse, MediaType, parse_accept

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: What the bytes of native pixel data are, once little endian: either label is true of them.
NATIVE_LE = (EXPLICIT_LE, IMPLICIT_LE)

#: Media type of the frames of each compressed transfer syntax (PS3.18 Table 8.7.3-5).
IMAGE_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
#: The transfer syntax an image media type means when the request names none (PS3.18 8.7.3.5.2).
DEFAULT_TS: dict[str, str] = {
    "image/jpeg": "1.2.840.10008.1.2.4.50", "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90", "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201", "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/dicom-rle": "1.2.840.10008.1.2.5", "image/x-dicom-rle": "1.2.840.10008.1.2.5",
    "image/x-jls": "1.2.840.10008.1.2.4.80",
}
#: Video syntaxes (MPEG-2/4, HEVC): one stream for all frames, not frames one by one.
VIDEO_TS = frozenset({"1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1", "1.2.840.10008.1.2.4.101",
                      "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
                      "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104",
                      "1.2.840.10008.1.2.4.104.1", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
                      "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1", "1.2.840.10008.1.2.4.107",
                      "1.2.840.10008.1.2.4.108"})
_WILDCARDS = ("*/*", "application/*", "image/*")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
#: Binary VRs: their values are bulk data in the metadata (BulkDataURI) past BULK_THRESHOLD bytes.
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
BULK_THRESHOLD = 1024
_FRAME_LIST = re.compile(r"[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*")
_BULK_PATH = re.compile(r"[0-9A-Fa-f]{8}(/[0-9]{1,6}/[0-9A-Fa-f]{8})*")
MAX_FRAMES_PER_REQUEST = 10000


class FrameError(Exception):
    """A request that cannot be answered: ``status`` and a message without content."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Offer:
    """How frames are sent: the syntax of the bytes, each part's media type, decoded or not."""

    ts: str
    part_type: str
    decode: bool
    multipart: bool


def _is_encapsulated(ts: str) -> bool:
    try:
        return bool(UID(ts).is_encapsulated)
    except (ValueError, AttributeError):
        return False


def negotiate(accept: list[MediaType], stored_ts: str, can_decode: bool, single_ok: bool) -> Offer | None:
    """The first acceptable way to send frames stored in ``stored_ts``, or None (406)."""
    encapsulated = _is_encapsulated(stored_ts)
    stored_type = IMAGE_TYPES.get(stored_ts, OCTET) if encapsulated else OCTET
    for m in accept:
        if m.type in ("*/*", "multipart/*"):
            inner, multipart = "*/*", True
        elif m.type == MULTIPART_RELATED:
            inner, multipart = m.params.get("type", OCTET).lower(), True
        else:
            inner, multipart = m.type, False
            if not single_ok:
                continue
        wildcard = inner in _WILDCARDS
        if not wildcard and inner != OCTET and inner not in DEFAULT_TS:
            continue  # e.g. application/dicom: not what frames are
        ts = m.params.get("transfer-syntax") or ("*" if wildcard else EXPLICIT_LE if inner == OCTET
                                                 else DEFAULT_TS[inner])
        label = OCTET if inner == OCTET else stored_type
        if ts == "*":
            if wildcard or inner == OCTET:
                return Offer(stored_ts if encapsulated else EXPLICIT_LE, label, False, multipart)
            if encapsulated and inner == stored_type:
                return Offer(stored_ts, inner, False, multipart)
            continue
        if encapsulated and ts == stored_ts and (wildcard or inner in (OCTET, stored_type)):
            return Offer(stored_ts, label, False, multipart)
        if ts in NATIVE_LE and (wildcard or inner == OCTET) and (not encapsulated or can_decode):
            return Offer(ts, OCTET, encapsulated, multipart)
    return None


def parse_frame_list(text: str) -> list[int]:
    if not _FRAME_LIST.fullmatch(text):
        raise FrameError(400, "frame list must be frame numbers (from 1) separated by commas")
    frames = [int(n) for n in text.split(",")]
    if len(frames) > MAX_FRAMES_PER_REQUEST:
        raise FrameError(400, f"more than {MAX_FRAMES_PER_REQUEST} frames in one request")
    return frames


def _pixel_element(ds: Dataset) -> Any:
    for tag in _PIXEL_TAGS:
        if tag in ds:
            return ds[tag]
    return None


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def decodable(ds: Dataset) -> bool:
    """Whether a compressed frame of ``ds`` decodes to native bytes its own header describes.

    Monochrome and palette images, and RGB: their decoded values are what the header says.  A
    YBR colour image decodes to another colour space or layout than its header names: not offered.
    """
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp == 1:
        return pi in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    return spp == 3 and pi == "RGB"


def _native_frame(ds: Dataset, elem: Any, index: int, n: int, big_endian: bool) -> bytes:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(int(elem.tag), int(ds.get("BitsAllocated", 8) or 8))
    data = elem.value
    pixels = rows * cols * spp
    if bits == 1:  # bits packed across frames: frame boundaries need not be on a byte
        if pixels % 8 == 0:
            frame = data[index * pixels // 8:(index + 1) * pixels // 8]
        else:
            flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            frame = np.packbits(flat[index * pixels:(index + 1) * pixels], bitorder="little").tobytes()
        if len(frame) * 8 < pixels:
            raise ValueError("stored pixel data shorter than its header says")
        return bytes(frame)
    size = pixels * bits // 8
    frame = data[index * size:(index + 1) * size]
    if len(frame) != size:
        raise ValueError("stored pixel data shorter than its header says")
    if big_endian and bits > 8:
        word = f">u{bits // 8}"
        frame = np.frombuffer(frame, word).astype(word.replace(">", "<")).tobytes()
    return bytes(frame)


def _encapsulated_frame(ds: Dataset, index: int, n: int) -> bytes:
    from pydicom.encaps import get_frame

    eot = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        eot = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return bytes(get_frame(ds.PixelData, index, extended_offsets=eot, number_of_frames=n))


def _decoded_frame(ds: Dataset, index: int) -> bytes:
    from pydicom.pixels import pixel_array

    arr = pixel_array(ds, index=index, raw=True)
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        arr = np.moveaxis(arr, -1, 0)  # the header says colour-by-plane: native bytes follow it
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def read_frames(ds: Dataset, stored_ts: str, frames: list[int], offer: Offer) -> list[bytes]:
    """The bytes of each requested frame (1-based) as ``offer`` says."""
    if stored_ts in VIDEO_TS:
        raise FrameError(406, "not acceptable: video pixel data is not served frame by frame")
    n = frame_count(ds)
    bad = [f for f in frames if f > n]
    if bad:
        raise FrameError(404, f"no frame {bad[0]}: the instance has {n}")
    if len(frames) > n:  # (repeats allowed, but never more bytes than the instance holds)
        raise FrameError(400, f"more frames asked for than the instance has ({n})")
    elem = _pixel_element(ds)
    out = []
    for f in frames:
        if offer.decode:
            out.append(_decoded_frame(ds, f - 1))
        elif _is_encapsulated(stored_ts):
            out.append(_encapsulated_frame(ds, f - 1, n))
        else:
            out.append(_native_frame(ds, elem, f - 1, n, stored_ts == BIG_ENDIAN))
    return out


def _frame_bytes(ds: Dataset, stored_ts: str, frames: list[int], offer: Offer) -> list[bytes]:
    """:func:`read_frames`, its failures as FrameError (406: no decoder here; 500: broken data)."""
    try:
        return read_frames(ds, stored_ts, frames, offer)
    except FrameError:
        raise
    except NotImplementedError:  # no decoder here for this syntax (e.g. a retired JPEG process)
        raise FrameError(406, "not acceptable: the stored transfer syntax cannot be decoded here; "
                              "ask for it (transfer-syntax=*)") from None
    except Exception:  # noqa: BLE001 - a broken or undecodable frame: an error, never other bytes
        log.exception("WADO-RS: a frame cannot be %s", "decoded" if offer.decode else "read")
        raise FrameError(500, "the frame cannot be " + ("decoded" if offer.decode else "read")) from None


def _multipart_body(parts: list[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    b = boundary.encode("ascii")
    for ctype, data in parts:
        yield b"--" + b + b"\r\nContent-Type: " + ctype.encode("ascii") + b"\r\n\r\n"
        yield data
        yield b"\r\n"
    yield b"--" + b + b"--\r\n"


def parts_response(parts: list[tuple[str, bytes]], part_type: str, multipart: bool,
                   headers: dict[str, str] | None = None) -> Response:
    if not multipart:
        ctype, data = parts[0]
        return Response(data, media_type=ctype, headers=headers)
    boundary = uuid.uuid4().hex
    body = b"".join(_multipart_body(parts, boundary))
    return Response(body, headers=headers,
                    media_type=f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}')


def _read(record: Record) -> Dataset:
    try:
        return pydicom.dcmread(record.path)
    except Exception:  # noqa: BLE001 - say which failed without its content
        log.exception("WADO-RS: cannot read a stored file")
        raise FrameError(500, "cannot read a stored instance") from None


def frames_response(request: Request, record: Record) -> Response:
    """``.../frames/{list}`` of one instance (runs in a worker thread: file I/O and decoding)."""
    try:
        frames = parse_frame_list(request.path_params.get("frames", ""))
        ds = _read(record)
        if _pixel_element(ds) is None or "Rows" not in ds:
            raise FrameError(404, "the instance has no pixel data")
        stored_ts = record.transfer_syntax
        offer = negotiate(parse_accept(request.headers.get("accept")), stored_ts, decodable(ds),
                          single_ok=len(frames) == 1)
        if offer is None:
            raise FrameError(406, "not acceptable: frames are served in their stored transfer syntax, "
                                  "or uncompressed (application/octet-stream, Explicit VR Little Endian)")
        data = _frame_bytes(ds, stored_ts, frames, offer)
    except FrameError as exc:
        return DicomJSONResponse({"error": str(exc)}, status_code=exc.status)
    ctype = f"{offer.part_type}; transfer-syntax={offer.ts}"
    return parts_response([(ctype, d) for d in data], offer.part_type, offer.multipart)


def _bulk_element(ds: Dataset, path: str) -> Any:
    steps = path.split("/")
    current: Dataset = ds
    for i in range(0, len(steps) - 1, 2):
        tag, index = int(steps[i], 16), int(steps[i + 1])
        if tag not in current or current[tag].VR != "SQ" or index >= len(current[tag].value):
            raise FrameError(404, "no such bulk data")
        current = current[tag].value[index]
    tag = int(steps[-1], 16)
    if len(steps) == 1 and tag == 0x7FE00010 and _pixel_element(ds) is not None:
        return _pixel_element(ds)  # the metadata names the pixels 7FE00010 whichever element holds them
    if tag not in current or current[tag].VR not in BINARY_VRS and tag not in _PIXEL_TAGS:
        raise FrameError(404, "no such bulk data")
    return current[tag]


def bulk_response(request: Request, record: Record) -> Response:
    """``.../bulkdata/{path}``: one element's value (Pixel Data: its frames, as /frames sends them)."""
    try:
        path = request.path_params.get("path", "")
        if not _BULK_PATH.fullmatch(path):
            raise FrameError(400, "bulk data path must be tags (8 hex digits) and item numbers")
        ds = _read(record)
        elem = _bulk_element(ds, path)
        accept = parse_accept(request.headers.get("accept"))
        stored_ts = record.transfer_syntax
        if int(elem.tag) in _PIXEL_TAGS and "/" not in path and "Rows" in ds:
            n = frame_count(ds)
            offer = negotiate(accept, stored_ts, decodable(ds), single_ok=n == 1 or not _is_encapsulated(stored_ts))
            if offer is None:
                raise FrameError(406, "not acceptable: pixel data is served in its stored transfer syntax, "
                                      "or uncompressed (application/octet-stream)")
            frames = _frame_bytes(ds, stored_ts, list(range(1, n + 1)), offer)
            ctype = f"{offer.part_type}; transfer-syntax={offer.ts}"
            if not _is_encapsulated(offer.ts):  # native: one value, all frames in it
                return parts_response([(ctype, b"".join(frames))], offer.part_type, offer.multipart)
            return parts_response([(ctype, f) for f in frames], offer.part_type, offer.multipart)
        for m in accept:
            multipart = m.type in ("*/*", "multipart/*") or (
                m.type == MULTIPART_RELATED and m.params.get("type", OCTET).lower() in (OCTET, "*/*", "application/*"))
            if multipart or m.type in (OCTET, "application/*"):
                return parts_response([(OCTET, bytes(elem.value or b""))], OCTET, multipart)
        raise FrameError(406, "not acceptable: bulk data is served as application/octet-stream")
    except FrameError as exc:
        return DicomJSONResponse({"error": str(exc)}, status_code=exc.status)


def bulk_data_uri(instance_url: str, path: list[str]) -> str:
    return f"{instance_url}/bulkdata/" + "/".join(path)


def metadata_json(ds: Dataset, instance_url: str, stored_ts: str) -> dict[str, Any]:
    """DICOM JSON of a header read without its pixel data: binary values over BULK_THRESHOLD bytes
    and the Pixel Data (present in every image: Rows and Columns are set) as BulkDataURIs."""
    out = _json(ds, instance_url, [])
    if "Rows" in ds and "Columns" in ds and not any(t in ds for t in (0x7FE00008, 0x7FE00009)):
        native_ow = not _is_encapsulated(stored_ts) and int(ds.get("BitsAllocated", 16) or 16) > 8
        out["7FE00010"] = {"vr": "OW" if native_ow else "OB",
                           "BulkDataURI": bulk_data_uri(instance_url, ["7FE00010"])}
    return out


def _json(ds: Dataset, instance_url: str, path: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        key = f"{int(elem.tag):08X}"
        if elem.VR == "SQ":
            items = [_json(item, instance_url, path + [key, str(i)]) for i, item in enumerate(elem.value)]
            out[key] = {"vr": "SQ", **({"Value": items} if items else {})}
            continue
        if elem.VR in BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
            out[key] = {"vr": elem.VR, "BulkDataURI": bulk_data_uri(instance_url, path + [key])}
            continue
        try:
            out[key] = elem.to_json_dict(None, BULK_THRESHOLD)
        except Exception:  # noqa: BLE001 - an invalid value is left out, as suppress_invalid_tags does
            log.warning("WADO-RS metadata: an attribute with an invalid value is left out")
    return out
