"""C-STORE: keep the instance exactly as received, then answer.

The encoded dataset from the association is written byte for byte (no decode/re-encode), so
every transfer syntax a sender proposes is kept as is.  Success goes back only after
:meth:`Ingestor.ingest` has made the file durable and committed the index row; any failure
answers a failure status so the sender keeps its copy and resends.  The data set arrives in a
:class:`scp_node.dimse.buffer.DataSetBuffer`: in memory, or a spool file once it is larger than 16 MiB.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt

from ..audit import AuditTrail, Event
from ..dimse.buffer import take_dataset
from ..dimse.status_codes import StoreStatus, status_dataset
from ..store.ingest import Ingestor, InvalidInstance, Origin, StorageFailure

log = logging.getLogger(__name__)


def handle_store(event: evt.Event, ingestor: Ingestor, audit: AuditTrail) -> Dataset:
    """EVT_C_STORE handler bound with the node's ingestor and audit trail."""
    rq = event.assoc.requestor
    origin = Origin(ae_title=str(rq.ae_title).strip(), address=str(rq.address), via="dimse")
    sop_uid = str(event.request.AffectedSOPInstanceUID or "")[:64]
    buffer = take_dataset(event.request)
    try:
        if buffer is not None:  # the fast path's buffer: in memory, or spooled past 16 MiB
            data: bytes | Path = buffer.path if buffer.path is not None else buffer.part10_bytes()
        else:  # pynetdicom's own path: its spool file ([node] fast_path = false), else memory
            data = _spooled_by_pynetdicom(event) or event.encoded_dataset(include_meta=True)
        ingestor.ingest(data, origin, expected_sop_class=str(event.context.abstract_syntax))
    except InvalidInstance as exc:  # its status: 0xA900 (SOP class or identity conflict), else 0xC000
        return _refuse(audit, origin, sop_uid, exc.status, str(exc))
    except StorageFailure as exc:
        return _refuse(audit, origin, sop_uid, StoreStatus.OUT_OF_RESOURCES, str(exc))
    except Exception as exc:  # noqa: BLE001 - never answer success for an unexpected failure
        log.exception("C-STORE processing failed")
        return _refuse(audit, origin, sop_uid, StoreStatus.PROCESSING_FAILURE, type(exc).__name__)
    finally:
        if buffer is not None:
            buffer.discard()  # a kept spool file was hard-linked into the storage first
    return status_dataset(StoreStatus.SUCCESS)


def _spooled_by_pynetdicom(event: evt.Event) -> Path | None:
    """The file pynetdicom wrote the data set to (``STORE_RECV_CHUNKED_DATASET``), if it did."""
    try:
        return event.dataset_path
    except AttributeError:
        return None


def _refuse(audit: AuditTrail, origin: Origin, sop_uid: str, status: StoreStatus, reason: str) -> Dataset:
    log.warning("C-STORE refused (0x%04X): %s", status, reason)
    audit.record(Event.INSTANCE_REJECTED, outcome="failure", ae_title=origin.ae_title, peer=origin.address,
                 sop_uid=sop_uid if sop_uid.replace(".", "").isdigit() else "",
                 detail=f"0x{int(status):04X} {reason}")
    return status_dataset(status, reason)
