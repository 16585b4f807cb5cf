"""The streaming multipart/related reader: framing, chunk boundaries, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import pytest

from scp_node.web.multipart import BodyTooLarge, MultipartError, read_parts


def _body(parts: list[bytes], boundary: bytes = b"b0und", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n" + epilogue


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _read(data: bytes, size: int = 7, boundary: str = "b0und", limit: int = 10**9,
          spool: Path | None = None) -> list[bytes]:
    parts = asyncio.run(read_parts(_chunks(data, size), boundary, limit, spool))
    try:
        return [p.read() for p in parts.items]
    finally:
        parts.close()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 64, 100000])
def test_parts_survive_any_chunking(size: int) -> None:
    payloads = [b"DICM" * 50, b"", b"\r\n--b0un not a boundary \r\n--b0unX", bytes(range(256))]
    assert _read(_body(payloads, preamble=b"ignored preamble\r\n", epilogue=b"tail"), size) == payloads


def test_headers_are_parsed_and_a_part_may_have_none() -> None:
    data = b"--x\r\n\r\nraw\r\n--x\r\nContent-Type: application/dicom; transfer-syntax=1.2\r\nX-A: b\r\n\r\nd\r\n--x--"
    parts = asyncio.run(read_parts(_chunks(data, 4), "x", 10**6))
    assert [p.headers for p in parts.items] == [{}, {"content-type": "application/dicom; transfer-syntax=1.2",
                                                     "x-a": "b"}]
    assert [p.read() for p in parts.items] == [b"raw", b"d"]
    parts.close()


def test_large_parts_spill_to_disk_in_the_spool_folder(tmp_path: Path) -> None:
    big = bytes(range(256)) * 40000  # 10 MB, over the in-memory spool size
    assert _read(_body([big]), size=65536, spool=tmp_path) == [big]


@pytest.mark.parametrize("data, message", [
    (b"no boundary at all", "ended before the closing boundary"),
    (b"--b0und\r\nContent-Type: application/dicom\r\n\r\ncut short", "ended before the closing boundary"),
    (b"--b0undXX\r\n\r\n", "not followed by CRLF"),
    (b"--b0und\r\nbroken header line\r\n\r\nx\r\n--b0und--", "malformed part header"),
    (b"", "ended before"),
])
def test_broken_framing_is_a_multipart_error(data: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        _read(data)


@pytest.mark.parametrize("boundary", [None, "", "x" * 201, "bad\x01", "caf\xe9"])
def test_bad_boundary_parameter(boundary: str | None) -> None:
    with pytest.raises(MultipartError, match="boundary"):
        _read(_body([b"x"]), boundary=boundary)  # type: ignore[arg-type]


def test_the_limit_counts_received_bytes() -> None:
    data = _body([b"x" * 1000])
    assert _read(data, limit=len(data)) == [b"x" * 1000]
    with pytest.raises(BodyTooLarge):
        _read(data, limit=len(data) - 1)


@pytest.mark.parametrize("boundary", ["x" * 71, "4e14bc8a-dbc0-4608-9bd8-f4e00b978be4-4e14bc8a-dbc0-4608-9bd8-f4e00b978be4",
                                      "y" * 200, "with space and ;,'()+_=:?"])
def test_long_and_odd_printable_boundaries_are_accepted(boundary: str) -> None:
    """Over RFC 2046's 70 characters (Orthanc joins two UUIDs: 73), up to 200 printable."""
    assert _read(_body([b"DICM", b"x"], boundary=boundary.encode()), size=5, boundary=boundary) == [b"DICM", b"x"]


def _with_length(payload: bytes, declared: str) -> bytes:
    return (b"--b0und\r\nContent-Type: application/dicom\r\nContent-Length: " + declared.encode("latin-1")
            + b"\r\n\r\n" + payload + b"\r\n--b0und--\r\n")


def test_a_part_content_length_is_optional_but_must_be_right() -> None:
    assert _read(_with_length(b"0123456789", "10")) == [b"0123456789"]
    assert _read(_with_length(b"", "0")) == [b""]
    for wrong in ("9", "11", "-1", "ten", "\xb2", "1" * 30, ""):
        with pytest.raises(MultipartError, match="Content-Length"):
            _read(_with_length(b"0123456789", wrong))
