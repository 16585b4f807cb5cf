"""DICOM SR output: the model's findings as a TID 1500 Comprehensive 3D SR, plus a JSON sidecar.

Public API::

    build_measurement_report(evidence, result, *, node, ...) -> highdicom.sr.Comprehensive3DSR
    write_report(sr, path) -> Path          # tmp + fsync + rename, read back before rename
    read_report(path) -> Comprehensive3DSR  # parse one back, TID 1500 content checked
    findings_json(sr, result) -> dict       # sidecar, no patient identifiers
    ReportingNode                           # who creates the SR (General Equipment)
"""

from scp_node.report.creator import ReportingNode
from scp_node.report.sidecar import findings_json
from scp_node.report.sr import build_measurement_report
from scp_node.report.storage import read_report, write_report

__all__ = [
    "ReportingNode",
    "build_measurement_report",
    "findings_json",
    "read_report",
    "write_report",
]
