"""Contributing Equipment item for the model (SOP Common, IHE AI Results convention).

Why: a PACS or audit tool that does not parse the SR content tree still needs to see, from
the header alone, which algorithm (and which build of it) produced the object. IHE AIR and
MONAI Deploy put that in the Contributing Equipment Sequence with Purpose of Reference
"Processing Algorithm" and a Device UID identifying the algorithm.
"""

from __future__ import annotations

import datetime

from highdicom import ContributingEquipment
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes as dcm_codes

from scp_node.engine.result import ModelIdentity
from scp_node.report import codes
from scp_node.report.creator import ReportingNode

_ST_MAX = 1024  # Contribution Description is ST


def contribution_description(model: ModelIdentity, node: ReportingNode, prompt_profile: str) -> str:
    """One line naming the model build and the node that ran it (ST, at most 1024 chars)."""
    test = " [TEST MODEL, no clinical meaning]" if model.is_test_model else ""
    digest = model.weights_sha256.strip().lower()
    text = (
        f"{model.name} {model.version}{test} (weights sha256 {digest}, "
        f"{model.device}, {model.dtype}, prompt profile {prompt_profile}) "
        f"run by {node.manufacturer} {node.software_version} "
        f"(AE {node.ae_title.strip()}, station {node.effective_station_name})"
    )
    return text[:_ST_MAX]


def model_equipment(
    model: ModelIdentity,
    node: ReportingNode,
    *,
    device_uid: str,
    prompt_profile: str,
    contribution_datetime: datetime.datetime,
) -> ContributingEquipment:
    """Contributing Equipment item for the model as "Processing Algorithm".

    Manufacturer is the node's (it packaged and ran the weights; the model itself carries no
    manufacturer in ``ModelIdentity``), Manufacturer's Model Name is the model name, Software
    Versions are the model version and the node version, Device UID is derived from the
    weights hash.

    highdicom only accepts the standard CID 7005 purposes, so the item is built as
    "Processing Equipment" and its purpose is then replaced by the IHE code.
    """
    item = ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64],
        software_versions=[model.version[:64], f"{node.manufacturer} {node.software_version}"[:64]],
        institution_name=node.institution_name,
        station_name=node.effective_station_name,
        contribution_datetime=contribution_datetime,
        contribution_description=contribution_description(model, node, prompt_profile),
    )
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    item.DeviceUID = device_uid
    return item
