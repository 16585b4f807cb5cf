"""TID 1600 Image Library of the SR: the source instances the model read, with TID 1602 descriptors.

Its own module because the Image Library is independent of what the model said; content.py
puts it before Imaging Measurements (TID 1500 row order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    ContainerContentItem,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    RelationshipTypeValues,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

logger = logging.getLogger(__name__)

#: Concept name highdicom uses for Image Library entries (SCT 260753009 "Source").
_LIBRARY_ENTRY = Code("260753009", "SCT", "Source")


@dataclass(frozen=True)
class SourceImage:
    """One referenced instance: its header and the frames (1-based) the model used, if any."""

    dataset: Dataset
    frame_numbers: tuple[int, ...] = ()



def _library_descriptors(image: Dataset) -> list:
    """TID 1602 descriptors for one image, or none when the header cannot supply them.

    highdicom builds them from attributes that are Type 2/3 in many IODs (CR has no Imager
    Pixel Spacing, Patient Orientation may be empty), so a real header can make it fail. The
    descriptors are optional in TID 1601; the reference itself is what matters.
    """
    try:
        return list(ImageLibraryEntryDescriptors(image))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        logger.debug("image library descriptors omitted for one instance: %s", type(exc).__name__)
        return []


def image_library(images: Sequence[SourceImage]) -> ContainerContentItem:
    """TID 1600 Image Library listing the source instances.

    Built here instead of with ``MeasurementReport(referenced_images=...)`` because highdicom
    0.28's ``ImageLibrary`` raises on headers that lack optional descriptor attributes (for
    example the CR ``RG1_UNCR.dcm``) and drops the group-level Frame of Reference.
    """
    group = ContainerContentItem(
        name=dcm_codes.DCM.ImageLibraryGroup,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    group.ContentSequence = hd.sr.ContentSequence()
    for source in images:
        entry = ImageContentItem(
            name=_LIBRARY_ENTRY,
            referenced_sop_class_uid=source.dataset.SOPClassUID,
            referenced_sop_instance_uid=source.dataset.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        descriptors = _library_descriptors(source.dataset)
        if descriptors:
            entry.ContentSequence = hd.sr.ContentSequence(descriptors)
        group.ContentSequence.append(entry)
    library = ContainerContentItem(
        name=dcm_codes.DCM.ImageLibrary,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library

