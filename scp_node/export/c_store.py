"""C-STORE SCU: send one stored SR to a DIMSE destination (the PACS), over TLS when it says ``tls = true``."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from ..config import Destination
from ..dimse.tls import client_context

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The destination did not take the instance; the message says what happened."""


def send_c_store(dest: Destination, path: Path, *, calling_ae_title: str, timeout: float = 60.0) -> int:
    """Open an association to ``dest``, C-STORE the file at ``path``, release; return the status.

    Success (0x0000) and the Warning statuses (0xB000, 0xB006, 0xB007: stored with coercion or
    elements discarded) count as delivered; anything else raises :class:`ExportError`.
    """
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 15.0)
    syntaxes = [str(ds.file_meta.TransferSyntaxUID)]
    syntaxes += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in syntaxes]
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    ctx = client_context(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(ctx, dest.host) if ctx is not None else None)
    if not assoc.is_established:
        what = ("rejected" if assoc.is_rejected else "failed (unreachable, refused or aborted)")
        raise ExportError(f"association to {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) {what}")
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if rsp is None or "Status" not in rsp:
        raise ExportError(f"no C-STORE response from {dest.name} (timeout or abort)")
    status = int(rsp.Status)
    if status == 0x0000 or status in (0xB000, 0xB006, 0xB007):
        return status
    comment = str(rsp.get("ErrorComment", ""))
    raise ExportError(f"{dest.name} answered C-STORE status 0x{status:04X} {comment}".strip())
