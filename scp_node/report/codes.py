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
