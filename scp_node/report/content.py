"""The SR content tree: TID 1500 Measurement Report for one series analysed by the model.

Tree (see ``build_content`` for why each part sits where it does)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants   TID 1204 (en-US or zh)
      HAS OBS CONTEXT  Observer Type = Device + TID 1004 attributes of the model
      HAS CONCEPT MOD  Procedure reported (CID 100, by modality)
      CONTAINS CONTAINER Image Library                             TID 1600
        CONTAINS CONTAINER Image Library Group
          CONTAINS IMAGE Source (+ TID 1602 descriptors)  ... one per source instance
      CONTAINS CONTAINER Imaging Measurements
        -- structured answer: one group per finding --
        CONTAINS CONTAINER Measurement Group    TID 1410 when the finding has a region, else TID 1501
          HAS OBS CONTEXT Tracking Identifier ("AI finding N: <finding>") / Tracking UID  TID 4108
          CONTAINS SCOORD Image Region = POLYLINE rectangle          (TID 1410 only)
            SELECTED FROM IMAGE the source image (+ frame)
          CONTAINS IMAGE Source of Measurement ... every source       (TID 1501 only)
          CONTAINS CODE Finding = SNOMED CT finding type
          HAS CONCEPT MOD Finding Site = SNOMED CT structure (+ HAS CONCEPT MOD Laterality)
          HAS CONCEPT MOD Algorithm Name / Version / Parameters     TID 4019
          CONTAINS NUM Diameter (mm)                                 TID 300
          CONTAINS CODE Qualitative Difference = change since the prior (compared prior only)
          CONTAINS TEXT Finding Site = the model's location (when not in the site table)
          CONTAINS TEXT Findings = the model's description
        -- structured parsing failed: one TID 1501 group --
          ... CODE Finding = Clinical finding, IMAGE Source of Measurement ...
          CONTAINS TEXT Comment = "structured parsing failed" note (with the reason)
          CONTAINS TEXT Findings = the model's free text
      CONTAINS CONTAINER Comparison to previous studies   (priors looked up only; report.comparison)
      CONTAINS CONTAINER Qualitative Evaluations                  TID 1500 rows 10-12
        CONTAINS CODE AI triage category = Normal | Abnormal | Urgent
        CONTAINS CODE Image Quality = Diagnostic quality | Limited quality
        CONTAINS TEXT Impression (+ the sentence on the prior), TEXT Recommendation
        CONTAINS TEXT Comment = AI review statement (zh and en for Chinese reports)
        CONTAINS TEXT Comment = test-model statement (test model only)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from scp_node.engine.result import AnalysisResult, Finding, ModelIdentity, StructuredFindings
from scp_node.engine.result import ImageRegion as ModelRegion
from scp_node.report import codes
from scp_node.report.comparison import change_evaluations, comparison_container, sentence, with_sentence
from scp_node.report.creator import ReportingNode
from scp_node.report.library import SourceImage, image_library
from scp_node.report.text import (
    clean_text,
    parse_failed_note,
    review_statements,
    test_model_statements,
)
from scp_node.report.uids import new_uid

logger = logging.getLogger(__name__)

#: Human-readable Tracking Identifier of the free-text measurement group.
TRACKING_IDENTIFIER = "AI findings (MedGemma)"


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



def report_language(result: AnalysisResult) -> str:
    """The report language, "en" unless the result asks for a language the report supports."""
    return result.language if result.language in codes.LANGUAGES else "en"


def _language_modifier(language: str) -> CodeContentItem:
    """TID 1204 modifier on one item whose language differs from the document's."""
    return CodeContentItem(
        name=dcm_codes.DCM.LanguageOfContentItemAndDescendants,
        value=codes.LANGUAGES[language],
        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
    )


def _text(name: Code, value: str, *, language: str | None = None) -> TextContentItem:
    """A CONTAINS TEXT item; ``language`` adds a TID 1204 modifier when it differs from the document's."""
    item = TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )
    if language is not None:
        item.ContentSequence = hd.sr.ContentSequence([_language_modifier(language)])
    return item


def _code(name: Code, value: Code) -> CodeContentItem:
    return CodeContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _statements(pairs: list[tuple[str, str]], document_language: str) -> list[TextContentItem]:
    """Comment TEXT items; a statement in another language than the document's says so."""
    return [
        _text(codes.COMMENT, text, language=None if lang == document_language else lang)
        for lang, text in pairs
    ]


def _source_images_for_group(sources: Sequence[SourceImage]) -> list[SourceImageForMeasurementGroup]:
    return [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=s.dataset.SOPClassUID,
            referenced_sop_instance_uid=s.dataset.SOPInstanceUID,
            referenced_frame_numbers=list(s.frame_numbers) or None,
        )
        for s in sources
    ]


def free_text_group(
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    findings_text: str,
    tracking_uid: str,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 measurement group that carries the model output as text (no structured answer).

    Why a TID 1501 group and TEXT row 12 ("qualitative evaluation in text form"): it is the
    place in TID 1500 where free text sits next to the Algorithm Identification and the
    Source of Measurement images, so the text is tied to the model and the images it read.
    When structured parsing failed, a Comment says so (with the reason), so nobody mistakes the
    missing coded findings for "no findings". highdicom 0.28 has no parameter for TEXT
    evaluations, so the items are appended to the group's content; its parser reads them back
    as ordinary content items.
    """
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=TRACKING_IDENTIFIER),
        finding_type=codes.FINDING_TYPE,
        algorithm_id=algorithm_identification(result),
        source_images=_source_images_for_group(sources),
    )
    content = group[0].ContentSequence
    if result.parse_error:
        note = parse_failed_note(report_language(result), result.parse_error)
        content.append(_text(codes.PARSE_NOTE, note))
    content.append(_text(codes.FINDINGS_TEXT, findings_text))
    return group


def tracking_label(number: int, finding: Finding) -> str:
    """Tracking Identifier of a finding: what OHIF and other viewers list it by, in words.

    The code meaning names the finding; for "other" (generic "Clinical finding") the model's own
    description is more telling, shortened to keep viewer labels readable.
    """
    name = codes.finding_type_code(finding.finding_type).meaning
    description = " ".join(clean_text(finding.description).split())
    if finding.finding_type not in codes.FINDING_TYPE_CODES or finding.finding_type == "other":
        if description:
            name = description if len(description) <= 60 else description[:59] + "…"
    return f"AI finding {number}: {name}"


def region_polyline(region: ModelRegion) -> np.ndarray:
    """The box as a closed 5-point POLYLINE in image pixel coordinates (column, row).

    PS3.3 C.18.6.1.1: SCOORD points are (x = column, y = row) with (0, 0) the top-left corner
    of the top-left pixel, which is exactly how ``ImageRegion`` row/column values are defined
    (continuous, 0 at the top-left edge), so no half-pixel shift is applied.
    """
    c0, r0, c1, r1 = region.col0, region.row0, region.col1, region.row1
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)


def _image_region(region: ModelRegion, result: AnalysisResult, by_uid: dict[str, SourceImage]) -> ImageRegion | None:
    """highdicom SCOORD Image Region on the source image the box is on, or None if unusable."""
    if not 0 <= region.source_index < len(result.sources):
        logger.warning("finding region names source %d of %d; region omitted",
                       region.source_index, len(result.sources))
        return None
    ref = result.sources[region.source_index]
    source = by_uid.get(str(ref.sop_instance_uid))
    if source is None:
        return None
    rows, columns = int(source.dataset.Rows), int(source.dataset.Columns)
    if not (0 <= region.col0 < region.col1 <= columns and 0 <= region.row0 < region.row1 <= rows):
        logger.warning("finding region lies outside the image (%d x %d); region omitted", rows, columns)
        return None
    frames = [ref.frame_number] if ref.frame_number is not None else None
    return ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=region_polyline(region),
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=source.dataset.SOPClassUID,
            referenced_sop_instance_uid=source.dataset.SOPInstanceUID,
            referenced_frame_numbers=frames,
        ),
    )


def _slice_image(index: int, result: AnalysisResult,
                 by_uid: dict[str, SourceImage]) -> SourceImageForMeasurementGroup | None:
    """The one source image (and frame) a CT/MR finding is on: the model's SLICE k is ``sources[k-1]``."""
    if not 0 <= index < len(result.sources):
        logger.warning("finding names slice %d of %d; it references every source image", index + 1,
                       len(result.sources))
        return None
    ref = result.sources[index]
    source = by_uid.get(str(ref.sop_instance_uid))
    if source is None:
        return None
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.dataset.SOPClassUID,
        referenced_sop_instance_uid=source.dataset.SOPInstanceUID,
        referenced_frame_numbers=[ref.frame_number] if ref.frame_number is not None else None,
    )


def finding_group(
    number: int,
    finding: Finding,
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    by_uid: dict[str, SourceImage],
) -> MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations:
    """One measurement group for one finding of the structured answer.

    With a region it is a TID 1410 planar ROI group (highdicom's
    ``PlanarROIMeasurementsAndQualitativeEvaluations``): the SCOORD sits at the top of the group,
    which is what OHIF's SR viewport reads to jump to the referenced image and draw it. Without a
    region it is a TID 1501 group that references every source image, as the free-text one does.
    """
    tracking = TrackingIdentifier(uid=str(new_uid()), identifier=tracking_label(number, finding))
    site = codes.finding_site(finding.location) if finding.location.strip() else None
    finding_sites = (
        [FindingSite(anatomic_location=site[0], laterality=site[1])] if site is not None else None
    )
    measurements = (
        [Measurement(name=codes.SIZE, value=float(finding.size_mm), unit=codes.MILLIMETER)]
        if finding.size_mm is not None
        else None
    )
    common = dict(
        tracking_identifier=tracking,
        finding_type=codes.finding_type_code(finding.finding_type),
        algorithm_id=algorithm_identification(result),
        finding_sites=finding_sites,
        measurements=measurements,
        qualitative_evaluations=change_evaluations(finding, result),
    )
    region = _image_region(finding.region, result, by_uid) if finding.region is not None else None
    slice_image = _slice_image(finding.source_index, result, by_uid) if finding.source_index is not None else None
    if region is not None:
        group = PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    elif slice_image is not None:
        # CT/MR: the model named the slice (SLICE k) the finding is on; boxes are documented for
        # chest X-ray only, so the group points at that one image instead of drawing a rectangle.
        group = MeasurementsAndQualitativeEvaluations(source_images=[slice_image], **common)
    else:
        group = MeasurementsAndQualitativeEvaluations(
            source_images=_source_images_for_group(sources), **common
        )
    content = group[0].ContentSequence
    location = clean_text(finding.location).strip()
    if location and site is None:
        content.append(_text(codes.FINDING_SITE, location))
    description = clean_text(finding.description).strip()
    if description:
        content.append(_text(codes.DESCRIPTION, description))
    return group


def qualitative_evaluations(
    result: AnalysisResult, structured: StructuredFindings | None
) -> ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": what the model says about the whole examination.

    Triage and image quality are CODE items so that a worklist can sort by them without reading
    text; impression and recommendation stay TEXT (the model's words). The AI review statement
    and the test-model label are here, once per document, in the document's language and, for a
    Chinese report, in English as well.
    """
    language = report_language(result)
    on_prior = sentence(result, language)  # "" when priors were not looked up
    items: list = []
    if structured is not None:
        items.append(_code(codes.TRIAGE, codes.TRIAGE_VALUES.get(structured.triage, codes.TRIAGE_VALUES["abnormal"])))
        items.append(_code(codes.IMAGE_QUALITY, codes.IMAGE_QUALITY_VALUES.get(
            structured.image_quality, codes.IMAGE_QUALITY_VALUES["limited"])))
    impression = with_sentence(structured.impression if structured is not None else "", on_prior)
    if impression:
        items.append(_text(codes.IMPRESSION, impression))
    if structured is not None:
        recommendation = clean_text(structured.recommendation).strip()
        if recommendation:
            items.append(_text(codes.RECOMMENDATION, recommendation))
    items.extend(_statements(review_statements(language), language))
    if result.model.is_test_model:
        items.extend(_statements(test_model_statements(language), language))
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def measurement_groups(
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    findings_text: str,
) -> list:
    """The Imaging Measurements groups: one per structured finding, else the free-text group.

    A structured answer that lists no findings still gets the free-text group (TID 1500 needs at
    least one group, and "the model named nothing" must not be coded as "no abnormality"). In
    "report" mode the model's own report is the text of the SR: its free-text group comes first,
    the coded findings extracted from it follow.
    """
    if result.structured is None or not result.structured.findings:
        return [free_text_group(result, sources, findings_text, str(new_uid()))]
    by_uid = {str(s.dataset.SOPInstanceUID): s for s in sources}
    groups = [
        finding_group(number, finding, result, sources, by_uid)
        for number, finding in enumerate(result.structured.findings, start=1)
    ]
    if getattr(result, "answer_mode", "") == "report" and findings_text.strip():
        groups.insert(0, free_text_group(result, sources, findings_text, str(new_uid())))
    return groups


def build_content(
    result: AnalysisResult,
    sources: Sequence[SourceImage],
    *,
    node: ReportingNode,
    device_uid: str,
    findings_text: str,
) -> MeasurementReport:
    """Assemble the TID 1500 tree in row order: Image Library before Imaging Measurements,
    Qualitative Evaluations last."""
    language = report_language(result)
    report = MeasurementReport(
        observation_context=observation_context(result.model, node, device_uid),
        procedure_reported=codes.procedure_reported(result.modality),
        imaging_measurements=measurement_groups(result, sources, findings_text),
        title=codes.DOCUMENT_TITLE,
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
            CodedConcept.from_code(codes.LANGUAGES[language])
        ),
    )
    root = report[0].ContentSequence
    position = next(
        (i for i, item in enumerate(root) if item.name == dcm_codes.DCM.ImagingMeasurements),
        len(root),
    )
    root.insert(position, image_library(sources))
    on_prior = comparison_container(result, language)
    if on_prior is not None:  # read before the impression that ends with its sentence
        root.append(on_prior)
    root.append(qualitative_evaluations(result, result.structured))
    return report
