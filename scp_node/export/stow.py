"""STOW-RS client: send one stored SR to a DICOMweb destination (``kind = "dicomweb"``).

Used by the export queue exactly like the C-STORE sender: return on success, raise
:class:`ExportError` otherwise, and the queue does the retrying and dead-lettering — so
dicomweb-client's own retry loop is switched off.  The bearer token goes only into the
Authorization header, never into a message.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from ..config import Destination
from .c_store import ExportError

log = logging.getLogger(__name__)


def send_stow(dest: Destination, path: Path, *, timeout: float = 60.0) -> int:
    """POST the file at ``path`` to ``dest.url``/studies; return the HTTP status (200 or 202).

    A response whose FailedSOPSequence names the instance, or one that is neither 200 nor 202,
    is a failure.  202 with our instance in ReferencedSOPSequence (stored with warnings) counts
    as delivered, as the C-STORE Warning statuses do.
    """
    ds = pydicom.dcmread(path)
    sop_uid = str(ds.SOPInstanceUID)
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    session = requests.Session()
    try:
        client = DICOMwebClient(url=dest.url, session=session, headers=headers,
                                timeout=(min(timeout, 15.0), timeout))
        client.set_http_retry_params(retry=False)
        try:
            rsp = client.store_instances([ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise ExportError(f"{dest.name} answered STOW-RS with HTTP {code}") from None
        except requests.RequestException as exc:
            raise ExportError(f"cannot reach {dest.name} ({dest.host}:{dest.port}): {type(exc).__name__}") from None
    finally:
        session.close()
    for item in rsp.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            reason = item.get("FailureReason")
            raise ExportError(f"{dest.name} refused the SR: FailureReason "
                              + (f"0x{int(reason):04X}" if reason is not None else "not given"))
    return 200
