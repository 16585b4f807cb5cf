"""Is a received dataset whole?  pydicom reads a truncated value without complaint.

A sender that aborts mid-dataset, or a file cut short, leaves the last element shorter than its
declared length.  pydicom keeps such an element as a short raw value; we look at every
top-level raw element (and the encapsulated Pixel Data framing) and refuse the instance, so a
partial image never reaches the index or the model.
"""

from __future__ import annotations

import threading
import warnings
from io import BytesIO
from typing import Any
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

UNDEFINED_LENGTH = 0xFFFFFFFF
_WARNINGS_LOCK = threading.Lock()


class IncompleteDataset(ValueError):
    """The dataset ends before its last element does."""


def check_complete(data: bytes) -> Dataset:
    """Parse the whole Part 10 byte string and raise :class:`IncompleteDataset` if it is cut short.

    Returns the parsed dataset (elements still raw, so nothing is decoded needlessly).
    """
    ds = _read_checked(BytesIO(data))
    for tag in list(ds.keys()):
        elem = ds._dict.get(tag)  # raw access: do not convert values we do not need
        if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
            continue
        got = 0 if elem.value is None else len(elem.value)
        if got < elem.length:
            raise IncompleteDataset(f"element {tag} is truncated ({got} of {elem.length} bytes)")
    last = ds._dict.get(max(ds.keys()))
    if getattr(last, "length", 0) == UNDEFINED_LENGTH and not data.endswith(_DELIMITERS):
        # An undefined-length last element (encapsulated Pixel Data, a sequence) must end with
        # its Sequence Delimitation Item; a byte missing there is a cut-short transfer.
        raise IncompleteDataset("the last element has no sequence delimiter (truncated)")
    return ds


def check_complete_file(path: Path) -> Dataset:
    """:func:`check_complete` for a file on disk, without loading large values into memory.

    Values over 64 KiB are deferred (pydicom records where they start and seeks past them); such a
    value is whole only if the file reaches its declared end.  Returns the parsed dataset (raw
    elements, large values deferred) so the caller needs no second parse.
    """
    size = path.stat().st_size
    ds = _read_checked(path, defer_size=65536)
    for tag in list(ds.keys()):
        elem = ds._dict.get(tag)
        if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
            continue
        if elem.value is None and elem.length:
            got = max(0, size - elem.value_tell) if elem.value_tell is not None else 0
        else:
            got = 0 if elem.value is None else len(elem.value)
        if got < elem.length:
            raise IncompleteDataset(f"element {tag} is truncated ({got} of {elem.length} bytes)")
    last = ds._dict.get(max(ds.keys()))
    if getattr(last, "length", 0) == UNDEFINED_LENGTH:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 8))
            if not fh.read(8).endswith(_DELIMITERS):
                raise IncompleteDataset("the last element has no sequence delimiter (truncated)")
    return ds


_DELIMITERS = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


def _read_checked(source: Any, **kwargs: Any) -> Dataset:
    """dcmread that turns pydicom's "ran out of bytes" warnings and an empty dataset into
    :class:`IncompleteDataset` (pydicom itself reads a cut-short dataset without raising)."""
    # catch_warnings swaps process-global state: without the lock, two handler threads would
    # record each other's warnings (or leave a recorder installed for good).
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(source, **kwargs)
    for w in caught:
        if "End of file reached" in str(w.message) or "before delimiter" in str(w.message):
            raise IncompleteDataset("dataset ends before a sequence or item delimiter (truncated)")
    if len(ds) == 0:
        raise IncompleteDataset("no data elements after the file meta information")
    return ds
