"""Every DIMSE status this node answers, in one place, each with its Error Comment.

Codes follow PS3.4 Annex B (Storage) and PS3.7 Annex C; the C-class codes are the ones
pynetdicom and dcm4chee use for data the SCP cannot understand.
"""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  #: could not write the file or the index row: resend later
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000  #: not parseable, unsafe or missing UIDs
    PROCESSING_FAILURE = 0x0110  #: unexpected failure inside the node


def status_dataset(status: StoreStatus, comment: str = "") -> Dataset:
    """A status dataset with an Error Comment (LO, at most 64 characters)."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != StoreStatus.SUCCESS:
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds
