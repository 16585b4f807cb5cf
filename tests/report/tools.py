"""Running the independent checkers (dicom3tools, DCMTK) on SRs the report code wrote."""

from __future__ import annotations

import subprocess

#: dciodvfy warnings we accept, as substrings (its 2022 dictionary predates Device UID inside the
#: Contributing Equipment Sequence); anything else is reported in the failure message.
DCIODVFY_EXPECTED_WARNINGS = (
    "(0x0018,0x1002) UI Device UID",
    "Standard Extended SOP Class",
    "Retired Person Name form",
    "needed to build DICOMDIR",
    "Value is zero for value 1 of attribute <Patient's Weight>",
)


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
