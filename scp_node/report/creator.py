"""Identity of this DICOM node as the creator of SR documents (General Equipment module).

(Named ``creator`` so that it is not mistaken for :mod:`scp_node.node`, which wires the node together.)
"""

from __future__ import annotations

from dataclasses import dataclass

from scp_node import __version__


def _check_length(label: str, value: str | None, maximum: int) -> None:
    """Reject values that would violate their VR at write time, where the error is far away."""
    if value is None:
        return
    if len(value) > maximum:
        raise ValueError(f"{label} is longer than {maximum} characters: {value!r}")
    if "\\" in value:
        raise ValueError(f"{label} must not contain a backslash (VR delimiter): {value!r}")


@dataclass(frozen=True)
class ReportingNode:
    """The node that creates the SR: General Equipment of the SR, and who ran the model.

    Values are validated against their VRs here (AE 16, SH 16, LO 64) so that a bad
    configuration fails at start-up instead of at the first write of a report.
    """

    ae_title: str  #: our AE title; written into the contribution description (AE)
    station_name: str | None = None  #: Station Name (SH); defaults to ``ae_title``
    manufacturer: str = "scp_node"  #: Manufacturer (LO)
    institution_name: str = "scp_node"  #: Institution Name (LO)
    manufacturer_model_name: str = "scp_node"  #: Manufacturer's Model Name (LO)
    software_version: str = __version__  #: Software Versions (LO)
    device_serial_number: str | None = None  #: Device Serial Number (LO)
    device_uid: str | None = None  #: Device UID (UI) of the node itself, if one is assigned
    institutional_department_name: str | None = None  #: (LO)

    def __post_init__(self) -> None:
        if not self.ae_title.strip():
            raise ValueError("ae_title must not be empty")
        _check_length("ae_title", self.ae_title, 16)
        _check_length("station_name", self.station_name, 16)
        for label in (
            "manufacturer",
            "institution_name",
            "manufacturer_model_name",
            "software_version",
            "device_serial_number",
            "institutional_department_name",
        ):
            _check_length(label, getattr(self, label), 64)
        if self.device_uid is not None:
            _check_length("device_uid", self.device_uid, 64)

    @property
    def effective_station_name(self) -> str:
        """Station Name to write: the configured one, else the AE title."""
        return self.station_name or self.ae_title.strip()
