"""Reading a ``multipart/related`` request body as it streams in, part by part.

Each part's body goes into a spooled temporary file (memory up to a few MiB, then disk in the
node's var folder), so a 2 GiB STOW-RS request never sits in memory as a whole.  The whole body
is read and checked before any part is stored: a body whose framing is broken is refused (400)
before a single instance enters the index.  The size limit is enforced on the bytes actually
received, so a chunked upload without Content-Length cannot get past it.

Liberal in what real clients send, strict about what is broken: a boundary longer than RFC
2046's 70 characters (Orthanc's DICOMweb plugin joins two UUIDs: 73) is accepted up to
:data:`MAX_BOUNDARY`; a part may carry a Content-Length or not, and one that it carries must be
the length of the part's body as delimited (a mismatch is a truncated or corrupt body: refused).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, AsyncIterator

#: Part bodies larger than this go to disk.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
#: Headers of one part larger than this are not a DICOMweb part.
MAX_HEADER_BYTES = 16 * 1024
#: Longest boundary parameter accepted. RFC 2046 says 70, but real clients exceed it (Orthanc's
#: DICOMweb plugin: 73); 200 printable characters still bound the delimiter search.
MAX_BOUNDARY = 200


class MultipartError(ValueError):
    """The body is not a well-formed multipart message (message says why; no content in it)."""


class BodyTooLarge(ValueError):
    """More bytes arrived than the configured limit."""


class TooManyParts(BodyTooLarge):
    """More parts arrived than the configured limit (the rest of the body is not parsed)."""


@dataclass
class Part:
    """One body part: its headers (names lower-cased) and its content in a spooled file."""

    headers: dict[str, str]
    body: IO[bytes]
    size: int = 0

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def read(self) -> bytes:
        self.body.seek(0)
        return self.body.read()

    def close(self) -> None:
        self.body.close()


@dataclass
class Parts:
    """All parts of one request; close() removes their spooled files."""

    items: list[Part] = field(default_factory=list)

    def close(self) -> None:
        for p in self.items:
            p.close()


def check_boundary(boundary: str | None) -> bytes:
    if not boundary or len(boundary) > MAX_BOUNDARY or any(ord(c) < 32 or ord(c) > 126 for c in boundary):
        raise MultipartError("missing or invalid boundary parameter")
    return boundary.encode("ascii")


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError("malformed part header line")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


def _check_part_length(part: Part) -> None:
    """A part's own Content-Length (optional) must match the body its delimiters enclose."""
    declared = part.headers.get("content-length")
    if declared is None:
        return
    declared = declared.strip()
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 20 or int(declared) != part.size:
        raise MultipartError("part Content-Length does not match the part's body")


async def read_parts(chunks: AsyncIterator[bytes], boundary: str | None, limit: int,
                     spool_dir: Path | None = None, max_parts: int | None = None) -> Parts:
    """Read the whole body from ``chunks``; return its parts or raise MultipartError / BodyTooLarge.

    ``max_parts`` bounds the number of parts: the part after the last allowed one raises
    :class:`TooManyParts` as soon as its headers are read, so a body of many tiny parts costs
    no more work than ``max_parts`` of them.

    The first delimiter may come without a leading CRLF (RFC 2046 allows a preamble before it);
    the body is matched as if it began with CRLF so every delimiter is ``CRLF--boundary``.
    """
    delim = b"\r\n--" + check_boundary(boundary)
    parts = Parts()
    buf = bytearray(b"\r\n")
    state = "preamble"
    received = 0
    current: Part | None = None
    scan_from = 0
    done = False
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
            if done:
                continue  # epilogue: ignored, but still counted against the limit
            buf += chunk
            while True:
                if state in ("preamble", "body"):
                    idx = buf.find(delim, scan_from)
                    if idx < 0:
                        keep = len(delim) - 1
                        if state == "body" and current is not None and len(buf) > keep:
                            current.body.write(buf[:-keep])
                            current.size += len(buf) - keep
                            del buf[:-keep]
                        elif state == "preamble" and len(buf) > keep:
                            del buf[:-keep]
                        scan_from = max(0, len(buf) - keep)
                        break
                    if state == "body" and current is not None:
                        current.body.write(buf[:idx])
                        current.size += idx
                        _check_part_length(current)
                    del buf[:idx + len(delim)]
                    scan_from = 0
                    state = "after-delim"
                if state == "after-delim":
                    if len(buf) < 2:
                        break
                    if buf[:2] == b"--":
                        done = True
                        state = "epilogue"
                        break
                    # Transport padding (spaces/tabs) may follow the boundary before CRLF.
                    stripped = bytes(buf).lstrip(b" \t")
                    if len(stripped) < 2:
                        break
                    if stripped[:2] != b"\r\n":
                        raise MultipartError("boundary not followed by CRLF")
                    del buf[:len(buf) - len(stripped)]
                    state = "headers"
                if state == "headers":
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_HEADER_BYTES:
                            raise MultipartError("part headers too long")
                        break
                    if max_parts is not None and len(parts.items) >= max_parts:
                        raise TooManyParts(f"more than {max_parts} parts in one request")
                    headers = _parse_headers(bytes(buf[2:end]))
                    del buf[:end + 4]
                    # The body starts right here; the CRLF before the next delimiter belongs to it.
                    current = Part(headers, tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES, dir=spool_dir))
                    parts.items.append(current)
                    state = "body"
                    scan_from = 0
                    continue
                if state == "epilogue":
                    break
        if not done:
            raise MultipartError("body ended before the closing boundary")
    except BaseException:
        parts.close()
        raise
    return parts
