"""Why an instance is refused: the errors of the receive path, with the status a caller answers.

Kept apart from :mod:`.ingest` so that :mod:`.index` (which raises :class:`IdentityConflict`
inside the transaction) and the ingest module that calls it do not import each other.
"""

from __future__ import annotations

from ..dimse.status_codes import StoreStatus


class InvalidInstance(ValueError):
    """The bytes are not a usable DICOM instance (message says why; no patient data in it).

    ``status`` is the DIMSE status (and STOW-RS FailureReason) a caller answers with.
    """

    status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND


class SOPClassMismatch(InvalidInstance):
    """The data set's SOP Class UID is not the one of its presentation context (or, for STOW-RS,
    of its file meta)."""

    status = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


class IdentityConflict(InvalidInstance):
    """The instance's Study, Series or Patient disagree with what the index holds for its UIDs
    (raised inside the index transaction by :mod:`.index`): a PACS never mixes patients."""

    status = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


class StorageFailure(RuntimeError):
    """The instance could not be kept (disk or index); the sender must be told to resend."""
