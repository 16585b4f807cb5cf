"""Coded concepts used in the AI findings SR, in one place.

Why a module of its own: every code here is a choice between several plausible concepts, and
a reviewer should be able to check all of them against PS3.16 without reading the tree-building
code. Codes come from ``pydicom.sr.codedict`` where the standard has them, so spelling and
meanings follow the DICOM release pydicom ships.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: TID 1500 document title (CID 7021 "Measurement Report Document Titles").
DOCUMENT_TITLE: Code = codes.cid7021.ImagingMeasurementReport  # (126000, DCM)

#: TID 1501 row 5 "Finding" value. The model talks about the whole series, not a lesion, so the
#: most generic SNOMED concept is the honest one (CID 6041-style specific findings would claim
#: a structured understanding the free text does not give).
FINDING_TYPE: Code = Code("404684003", "SCT", "Clinical finding")

#: Concept name of the TEXT item that carries the model output (TID 1501 row 12, "qualitative
#: evaluation in text form"). Deliberately NOT (121071, DCM, "Finding"): that concept is the
#: CODE row 5 of TID 1501, and re-using it for TEXT makes the group ambiguous for parsers that
#: look up "the" Finding item. (121070, DCM, "Findings") is the CID 7002 report element.
FINDINGS_TEXT: Code = codes.DCM.Findings  # (121070, DCM, "Findings")

#: Concept name of the TEXT items carrying the review and test-model statements.
COMMENT: Code = codes.DCM.Comment  # (121106, DCM, "Comment")

#: Observer type for TID 1002 (CID 270).
DEVICE_OBSERVER: Code = codes.cid270.Device  # (121007, DCM, "Device")

#: Purpose of Reference for the model in the Contributing Equipment Sequence.
#: IHE Radiology "AI Results" (AIR) and MONAI Deploy use (Newcode1, 99IHE, "Processing
#: Algorithm"). Note: (109103, DCM) is "Modifying Equipment", not "Processing Algorithm";
#: the standard CID 7005 has no algorithm concept yet, hence the IHE private code.
PROCESSING_ALGORITHM: Code = Code("Newcode1", "99IHE", "Processing Algorithm")

#: Coding Scheme Identification for the private 99IHE designator (PS3.16 section 8.2: private
#: designators start with "99" and should be identified in the SOP Common module).
IHE_CODING_SCHEME = {
    "designator": "99IHE",
    "name": "IHE Radiology AI Results (AIR) profile codes",
    "responsible_organization": "IHE Radiology",
}

#: CID 100 "Quantitative Diagnostic Imaging Procedures", by source Modality. The procedure
#: reported is what was imaged, so it follows the modality; unknown ones get the generic
#: "Imaging procedure" rather than a guess.
_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
    "RG": codes.cid100.XRUnspecifiedBodyRegion,
    "PX": codes.cid100.XRUnspecifiedBodyRegion,
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
}


def procedure_reported(modality: str) -> Code:
    """Return the CID 100 "Procedure reported" concept for a source ``Modality``."""
    return _PROCEDURE_BY_MODALITY.get(
        (modality or "").strip().upper(), codes.cid100.ImagingProcedure
    )


# --- Structured findings (TID 1501 / TID 1410 measurement groups) ---------------------------

#: FINDING_TYPES -> TID 1501 row "Finding" value (SNOMED CT). Where DICOM PS3.16 already lists a
#: concept (CID 6102 "Thoracic Radiographic Findings" and neighbours) that one is used, with the
#: meaning pydicom ships; the others are SNOMED CT disorder/finding concepts with their preferred
#: terms. "other" is the generic "Clinical finding": the model's own words then go into the
#: group's description TEXT, never into a made-up code.
FINDING_TYPE_CODES: dict[str, Code] = {
    "no_acute_finding": Code("281900007", "SCT", "No abnormality detected"),
    "pleural_effusion": codes.SCT.PleuralEffusion,  # 60046008
    "pneumothorax": codes.SCT.Pneumothorax,  # 36118008
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "nodule": codes.SCT.Nodule,  # 27925004
    "mass": codes.SCT.Mass,  # 4147007
    "cardiomegaly": codes.SCT.Cardiomegaly,  # 287272002
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "pulmonary_edema": codes.SCT.PulmonaryEdema,  # 19242006
    "fracture": Code("125605004", "SCT", "Fracture of bone"),
    "other": FINDING_TYPE,  # 404684003 Clinical finding
}


def finding_type_code(finding_type: str) -> Code:
    """SNOMED CT concept of a finding type; unknown types are "Clinical finding" (the "other" row)."""
    return FINDING_TYPE_CODES.get(finding_type, FINDING_TYPE)


#: TID 1501/1410 "Finding Site" concept name (SCT 363698007). Used for the coded site and, with
#: value type TEXT, for a location the table below does not know (the model's words, kept).
FINDING_SITE: Code = codes.SCT.FindingSite

#: CID 244 laterality values, as TID 1501 "Laterality" concept modifiers of the finding site.
LATERALITY: dict[str, Code] = {
    "right": codes.SCT.Right,
    "left": codes.SCT.Left,
    "bilateral": codes.SCT.Bilateral,
}

#: Anatomic structures of the chest (CID 6102/6109/6170/4 entries as pydicom ships them) for which
#: a laterality makes sense ("right lower lobe" = lower lobe of lung + Right).
_PAIRED_SITES: dict[str, Code] = {
    "lung": codes.SCT.Lung,  # 39607008
    "upper lobe": codes.SCT.UpperLobeOfLung,  # 45653009
    "lower lobe": codes.SCT.LowerLobeOfLung,  # 90572001
    "pleura": codes.SCT.Pleura,  # 3120008
    "pleural space": codes.SCT.Pleura,
    "hilum": codes.SCT.HilumOfLung,  # 46750007
    "rib": codes.SCT.Rib,  # 113197003
    "ribs": codes.SCT.Rib,
    "clavicle": codes.SCT.Clavicle,  # 51299004
    "hemidiaphragm": codes.SCT.Diaphragm,  # 5798000
}

#: Structures coded without laterality.
_UNPAIRED_SITES: dict[str, Code] = {
    "lungs": codes.SCT.Lung,
    "middle lobe": codes.SCT.MiddleLobeOfRightLung,  # 72481006
    "right middle lobe": codes.SCT.MiddleLobeOfRightLung,
    "heart": codes.SCT.Heart,  # 80891009
    "cardiac silhouette": codes.SCT.Heart,
    "mediastinum": codes.SCT.Mediastinum,  # 72410000
    "diaphragm": codes.SCT.Diaphragm,
    "trachea": codes.SCT.Trachea,  # 44567001
    "thoracic spine": codes.SCT.ThoracicSpine,  # 122495006
    "chest": codes.SCT.Chest,  # 816094009
    "thorax": codes.SCT.Chest,
}

#: Abbreviations and Chinese terms radiologists and the model use, normalised to the English key.
_SITE_SYNONYMS: dict[str, str] = {
    "rul": "right upper lobe", "rml": "right middle lobe", "rll": "right lower lobe",
    "lul": "left upper lobe", "lll": "left lower lobe",
    "both lungs": "bilateral lung", "bilateral lungs": "bilateral lung",
    "右肺上叶": "right upper lobe", "右上肺": "right upper lobe",
    "右肺中叶": "right middle lobe", "右中肺": "right middle lobe",
    "右肺下叶": "right lower lobe", "右下肺": "right lower lobe",
    "左肺上叶": "left upper lobe", "左上肺": "left upper lobe",
    "左肺下叶": "left lower lobe", "左下肺": "left lower lobe",
    "右肺": "right lung", "左肺": "left lung", "双肺": "bilateral lung", "两肺": "bilateral lung",
    "右侧胸腔": "right pleural space", "左侧胸腔": "left pleural space",
    "右侧胸膜": "right pleura", "左侧胸膜": "left pleura", "胸膜": "pleura",
    "心脏": "heart", "心影": "cardiac silhouette", "纵隔": "mediastinum", "膈肌": "diaphragm",
    "气管": "trachea", "胸椎": "thoracic spine", "胸部": "chest",
}


def finding_site(location: str) -> tuple[Code, Code | None] | None:
    """Coded (structure, laterality) for a model location, or None when the table has no entry.

    Matching is exact after normalisation (case, punctuation, white space, a leading "the"), so a
    location is coded only when it means exactly the listed structure; anything more specific or
    unusual stays the model's text (written as a TEXT Finding Site), which loses nothing.
    """
    key = " ".join(location.lower().replace(",", " ").replace(".", " ").split())
    if key.startswith("the "):
        key = key[4:]
    key = _SITE_SYNONYMS.get(key, key)
    if key in _UNPAIRED_SITES:
        return _UNPAIRED_SITES[key], None
    side, _, structure = key.partition(" ")
    if side in LATERALITY and structure in _PAIRED_SITES:
        return _PAIRED_SITES[structure], LATERALITY[side]
    if key in _PAIRED_SITES:
        return _PAIRED_SITES[key], None
    return None


#: Size of a finding (TID 300 NUM). The model's "size_mm" is the largest dimension it states,
#: which radiology reports call the diameter; (81827009, SCT, "Diameter") is the CID 7470 concept.
SIZE: Code = codes.SCT.Diameter
#: UCUM millimetre, the unit of ``Finding.size_mm``.
MILLIMETER: Code = codes.UCUM.Millimeter

#: Per-finding description (TEXT). The same concept as the whole-answer text, because both are
#: the model's findings in words; (121071, DCM, "Finding") stays reserved for the CODE row.
DESCRIPTION: Code = FINDINGS_TEXT

# --- Document-level qualitative evaluations (TID 1500 "Qualitative Evaluations") -----------

#: TID 1500 container for evaluations about the whole report rather than one finding.
QUALITATIVE_EVALUATIONS: Code = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: CID 7002 report elements for the model's impression and recommendation (TEXT).
IMPRESSION: Code = codes.DCM.Impression  # (121073, DCM)
RECOMMENDATION: Code = codes.DCM.Recommendation  # (121075, DCM)

#: Image quality (CODE): (111101, DCM, "Image Quality") from the CAD templates, valued with the
#: CID 7036 RadLex terms "Diagnostic quality" (RID12) for "adequate" and "Limited quality" (RID13)
#: for "limited" (the engine's quality gate).
IMAGE_QUALITY: Code = codes.DCM.ImageQuality
IMAGE_QUALITY_VALUES: dict[str, Code] = {
    "adequate": codes.RADLEX.DiagnosticQuality,
    "limited": codes.RADLEX.LimitedQuality,
}

#: Private coding scheme of this node, for the concepts DICOM and SNOMED CT do not offer: the
#: interval since the prior study (``PRIOR_INTERVAL`` below) and the *name* "AI triage category"
#: (SNOMED "Priority" 260870009 is an order priority and would read as one). Its *values* are
#: standard SNOMED CT qualifier values, so receivers can still act on them: Normal (17621005) and
#: Abnormal (263654008) are CID 222 "Normal-Abnormal", Urgent (103391001) is the CID 3414 urgency
#: concept. PS3.16 section 8: private designators start "99".
SCP_NODE_CODING_SCHEME = {
    "designator": "99SCPNODE",
    "name": "scp_node private codes",
    "responsible_organization": "scp_node",
}
TRIAGE: Code = Code("TRIAGE", "99SCPNODE", "AI triage category")
TRIAGE_VALUES: dict[str, Code] = {
    "normal": codes.SCT.Normal,
    "abnormal": codes.SCT.Abnormal,
    "urgent": Code("103391001", "SCT", "Urgent"),
}

#: Explanation of free text when the structured answer could not be parsed (TEXT, Comment).
PARSE_NOTE: Code = COMMENT

#: RFC 5646 language tags (TID 1204, CID 5000) of the report languages.
LANGUAGES: dict[str, Code] = {
    "en": Code("en-US", "RFC5646", "English (United States)"),
    "zh": Code("zh", "RFC5646", "Chinese"),
}

# --- Comparison with a prior study (issue 17) -----------------------------------------------

#: Concept name of a finding's change since the prior study (CONTAINS CODE in the finding's
#: measurement group, a TID 1501/1410 "qualitative evaluation"). (111049, DCM, "Qualitative
#: Difference") is the DICOM CAD templates' name for the qualitative temporal difference of one
#: finding against a prior; those templates value it from CID 6038/6134, whose entries describe
#: *what* differs (size, border, "No significant changes in the finding") but have no "improved",
#: "worsened" or "resolved", hence the values below.
CHANGE: Code = codes.DCM.QualitativeDifference  # (111049, DCM)

#: ``Finding.change`` -> SNOMED CT qualifier values of clinical course (all five are standard, so
#: no private code is needed): Improving 385633008 and Worsening 230993007 are the values of HL7
#: FHIR's ClinicalImpression "change pattern" value set; Stable 58158008, New 7147002 and Resolved
#: 723506003 are the sibling qualifier values (SNOMED CT International, "(qualifier value)").
CHANGE_VALUES: dict[str, Code] = {
    "new": Code("7147002", "SCT", "New"),
    "improved": Code("385633008", "SCT", "Improving"),
    "stable": Code("58158008", "SCT", "Stable"),
    "worsened": Code("230993007", "SCT", "Worsening"),
    "resolved": Code("723506003", "SCT", "Resolved"),
}

#: Document-level container of what the report says about priors: (111424, DCM, "Comparison to
#: previous studies"), the CID 6052/6053 report section/element for exactly that.
COMPARISON: Code = codes.DCM.ComparisonToPreviousStudies  # (111424, DCM)
#: Whether a prior was compared (CODE, valued with CID 230 Yes/No).
COMPARISON_DONE: Code = codes.DCM.ComparisonWithPriorStudyDone  # (122140, DCM)
YES: Code = codes.SCT.Yes  # (373066001, SCT)
NO: Code = codes.SCT.No  # (373067005, SCT)
#: The prior study and series (UIDREF) and its date (DATE), as TID 1001/1005 name them.
STUDY_INSTANCE_UID: Code = codes.DCM.StudyInstanceUID  # (110180, DCM)
SERIES_INSTANCE_UID: Code = codes.DCM.SeriesInstanceUID  # (112002, DCM)
STUDY_DATE: Code = codes.DCM.StudyDate  # (111060, DCM)
#: Days between the prior and the current study (NUM, UCUM "d"). No DICOM or SNOMED concept names
#: "interval since the prior study" (SCT 385673002 "Interval" is an echo measured property, DCM
#: 122640 "Image Interval" is acquisition timing), so it is the node's private code.
PRIOR_INTERVAL: Code = Code("PRIORINTERVAL", "99SCPNODE", "Interval since prior study")
DAYS: Code = codes.UCUM.Day  # (d, UCUM, "day")


def change_code(change: str) -> Code | None:
    """The coded change of a finding, or None for "" (no prior compared) or an unknown value."""
    return CHANGE_VALUES.get((change or "").strip().lower())
