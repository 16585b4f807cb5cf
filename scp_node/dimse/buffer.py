"""A received C-STORE data set: in memory while it is small, in a spool file once it is not.

pynetdicom offers two ways to receive a data set: all of it in memory (a 2 GiB multi-frame
would be held whole), or every one in a temporary file (``STORE_RECV_CHUNKED_DATASET``), which
for an ordinary CT slice cost a temporary file, a pydicom-written File Meta header, a flush per
fragment and a read back: about a tenth of the receive path's CPU.  :class:`DataSetBuffer` does
both: fragments go to memory up to :data:`IN_MEMORY_LIMIT` bytes; the fragment that would cross
it moves everything to a Part 10 spool file (header first), and the rest of the data set is
appended there, so memory stays bounded whatever the sender sends.

:class:`scp_node.dimse.pynetdicom_internals.ReceivingDIMSE` (the fast path) gives each incoming
message such a buffer; the C-STORE handler then takes the bytes (:meth:`DataSetBuffer.part10_bytes`) or the spool file
(:attr:`DataSetBuffer.path`) and discards the buffer when done.  A data set cut off by an abort
never completes: its spool file is removed when the association's DUL thread ends.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..store.ingest import IN_MEMORY_PARSE_LIMIT

#: Data sets up to this size are received in memory; larger ones are spooled to disk.  The same
#: bound as the ingest's in-memory parse: a spooled file is always parsed from disk.
IN_MEMORY_LIMIT = IN_MEMORY_PARSE_LIMIT


class DataSetBuffer(io.BytesIO):
    """The data set of one incoming DIMSE message, spilling to a spool file past ``limit`` bytes.

    ``header`` is called once, at the spill, for the Part 10 header that starts the spool file
    (the command set, and so the SOP Class and Instance, is always complete by then).
    """

    def __init__(self, spool_dir: Path | None, header: Callable[[], bytes], limit: int | None = None) -> None:
        super().__init__()
        self._spool_dir = spool_dir
        self._header = header
        self._limit = IN_MEMORY_LIMIT if limit is None else limit
        self._file: Any = None
        #: The Part 10 spool file once the data set outgrew memory, else None.
        self.path: Path | None = None

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self._file is None:
            if self.tell() + len(data) <= self._limit:
                return super().write(data)
            self._spill()
        return self._file.write(data)

    def _spill(self) -> None:
        if self._spool_dir is not None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".", suffix=".spool.tmp", dir=self._spool_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=1024 * 1024)
        self._file.write(self._header())
        with self.getbuffer() as view:
            self._file.write(view)
        self.seek(0)
        self.truncate()

    def finish(self) -> None:
        """The last fragment is in: close the spool file (its bytes are then all on the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def part10_bytes(self) -> bytes:
        """The whole Part 10 instance of an in-memory data set (header + data set)."""
        if self.spilled:
            raise ValueError("the data set was spooled to a file: use .path")
        return self._header() + self.getvalue()

    def discard(self) -> None:
        """Drop the data: close and remove the spool file, free the memory."""
        self.finish()
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None
        self.seek(0)
        self.truncate()


def take_dataset(request: Any) -> DataSetBuffer | None:
    """The :class:`DataSetBuffer` of a C-STORE request received by the fast path, else None."""
    buffer = getattr(request, "DataSet", None)
    if isinstance(buffer, DataSetBuffer):
        buffer.finish()
        return buffer
    return None
