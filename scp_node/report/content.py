"""The SR content tree: TID 1500 Measurement Report for one series analysed by the model.

Tree (see ``build_content`` for why each part sits where it does)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants   TID 1204
      HAS OBS CONTEXT  Observer Type = Device + TID 1004 attributes of the model
      HAS CONCEPT MOD  Procedure reported (CID 100, by modality)
      CONTAINS CONTAINER Image Library                             TID 1600
        CONTAINS CONTAINER Image Library Group
          CONTAINS IMAGE Source (+ TID 1602 descriptors)  ... one per source instance
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group                       TID 1501
          HAS OBS CONTEXT Tracking Identifier / Tracking Unique Identifier   TID 4108
          CONTAINS CODE Finding = Clinical finding
          HAS CONCEPT MOD Algorithm Name / Version / Parameters    TID 4019
          CONTAINS IMAGE Source of Measurement ... one per source instance (with frames)
          CONTAINS TEXT Comment = review statement                 TID 1501 row 12
          CONTAINS TEXT Comment = test-model statement (test model only)
          CONTAINS TEXT Findings = the model's answer
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from scp_node.engine.result import AnalysisResult, ModelIdentity
from scp_node.report import codes
from scp_node.report.node import ReportingNode
from scp_node.report.text import REVIEW_STATEMENT, TEST_MODEL_STATEMENT

logger = logging.getLogger(__name__)

#: Human-readable Tracking Identifier of the one measurement group.
TRACKING_IDENTIFIER = "AI findings (MedGemma)"

#: Concept name highdicom uses for Image Library entries (SCT 260753009 "Source").
_LIBRARY_ENTRY = Code("260753009", "SCT", "Source")


@dataclass(frozen=True)
class SourceImage:
    """One referenced instance: its header and the frames (1-based) the model used, if any."""

    dataset: Dataset
    frame_numbers: tuple[int, ...] = ()


def algorithm_parameters(result: AnalysisResult) -> list[str]:
    """TID 4019 "Algorithm Parameters": what, besides name and version, makes a run repeatable."""
    model = result.model
    return [
        f"weights_sha256={model.weights_sha256.strip().lower()}",
        f"prompt_profile={result.prompt_profile}",
        f"device={model.device}",
        f"dtype={model.dtype}",
        f"test_model={'true' if model.is_test_model else 'false'}",
    ]


def algorithm_identification(result: AnalysisResult) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model (name, version, parameters)."""
    return AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=algorithm_parameters(result),
    )


def observation_context(
    model: ModelIdentity, node: ReportingNode, device_uid: str
) -> ObservationContext:
    """TID 1001 with a device observer (TID 1004) that is the model, run by this node.

    No person observer: nobody has seen the content yet, which is exactly what
    VerificationFlag UNVERIFIED says at the document level.
    """
    attributes = DeviceObserverIdentifyingAttributes(
        uid=device_uid,
        name=model.name,
        manufacturer_name=node.manufacturer,
        model_name=f"{model.name} {model.version}",
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=CodedConcept.from_code(codes.DEVICE_OBSERVER),
            observer_identifying_attributes=attributes,
        )
    )


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


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


def findings_group(
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    findings_text: str,
    tracking_uid: str,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 measurement group that carries the model output as text.

    Why a TID 1501 group and TEXT row 12 ("qualitative evaluation in text form"): it is the
    place in TID 1500 where free text sits next to the Algorithm Identification and the
    Source of Measurement images, so the text is tied to the model and the images it read.
    highdicom 0.28 has no parameter for TEXT evaluations, so the items are appended to the
    group's content; its parser reads them back as ordinary content items.
    """
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=TRACKING_IDENTIFIER),
        finding_type=codes.FINDING_TYPE,
        algorithm_id=algorithm_identification(result),
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=s.dataset.SOPClassUID,
                referenced_sop_instance_uid=s.dataset.SOPInstanceUID,
                referenced_frame_numbers=list(s.frame_numbers) or None,
            )
            for s in sources
        ],
    )
    content = group[0].ContentSequence
    content.append(_text(codes.COMMENT, REVIEW_STATEMENT))
    if result.model.is_test_model:
        content.append(_text(codes.COMMENT, TEST_MODEL_STATEMENT))
    content.append(_text(codes.FINDINGS_TEXT, findings_text))
    return group


def build_content(
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    *,
    node: ReportingNode,
    device_uid: str,
    findings_text: str,
    tracking_uid: str,
) -> MeasurementReport:
    """Assemble the TID 1500 tree; Image Library goes before Imaging Measurements (row order)."""
    report = MeasurementReport(
        observation_context=observation_context(result.model, node, device_uid),
        procedure_reported=codes.procedure_reported(result.modality),
        imaging_measurements=[findings_group(result, sources, findings_text, tracking_uid)],
        title=codes.DOCUMENT_TITLE,
    )
    root = report[0].ContentSequence
    position = next(
        i for i, item in enumerate(root) if item.name == dcm_codes.DCM.ImagingMeasurements
    )
    root.insert(position, image_library(sources))
    return report
