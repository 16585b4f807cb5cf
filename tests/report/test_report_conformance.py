"""External validation of written SRs: dciodvfy (dicom3tools), dsrdump and dsr2html (DCMTK).

Every SR must pass dciodvfy with exit status 0 and no "Error" line. Warnings are allowed and
collected; the expected ones come from the source headers (e.g. single-component names) and
from dciodvfy's 2022 dictionary not yet knowing Device UID inside the Contributing Equipment
Sequence (added to the standard later; IHE AIR requires it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.report import build_measurement_report, write_report

from .tools import DCIODVFY_EXPECTED_WARNINGS, run_tool

LONG_TEXT = "\r\n".join(
    f"{i}. Lungs clear, no effusion, no pneumothorax, cardiomediastinal silhouette normal."
    for i in range(2000)
)
NON_ASCII_TEXT = "Herzgröße normal, kein Pleuraerguss, Zwerchfell glatt. 心脏大小正常，双肺清晰。"

#: case name -> (evidence fixture, findings text, test model?)
CASES = {
    "cxr_rg1_test_model": ("cxr_rg1", "No acute cardiopulmonary abnormality.", True),
    "cxr_mono1_medgemma": ("cxr_mono1", "Heart size normal. No focal consolidation.", False),
    "ct_133_medgemma": ("ct_report", None, False),
    "mr_wrist_test_model": ("mr_series", "No joint effusion.", True),
    "cxr_non_ascii": ("cxr_rg1", NON_ASCII_TEXT, False),
    "cxr_long_text": ("cxr_rg1", LONG_TEXT, False),
    "cxr_empty_text": ("cxr_rg1", "", True),
}

@pytest.fixture(scope="module")
def written(
    request, tmp_path_factory, make_result, node, strict_writing_mode
) -> dict[str, tuple[Path, str]]:
    """All cases written once to disk: name -> (path, findings text)."""
    out = tmp_path_factory.mktemp("sr")
    files: dict[str, tuple[Path, str]] = {}
    with strict_writing_mode():
        for name, (fixture, text, test_model) in CASES.items():
            if fixture == "ct_report":
                sr, result = request.getfixturevalue("ct_report")
                text = result.findings_text
            else:
                evidence = request.getfixturevalue(fixture)
                sr = build_measurement_report(
                    evidence, make_result(evidence, text, test_model=test_model), node=node
                )
            files[name] = (write_report(sr, out / f"{name}.dcm"), text)
    return files


@pytest.mark.parametrize("case", list(CASES))
def test_dciodvfy_has_no_errors(case, written, require_tool):
    dciodvfy = require_tool("dciodvfy")
    path, _ = written[case]
    run = run_tool(dciodvfy, str(path))
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert run.returncode == 0 and not errors, "\n".join(errors)
    warnings = [line for line in lines if line.startswith("Warning")]
    unexpected = [w for w in warnings if not any(e in w for e in DCIODVFY_EXPECTED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


@pytest.mark.parametrize("case", list(CASES))
def test_dsrdump_shows_tid1500(case, written, require_tool):
    dsrdump = require_tool("dsrdump")
    path, text = written[case]
    run = run_tool(dsrdump, "+Pt", "+Pl", str(path))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Comprehensive 3D SR Document" in out
    assert "TID 1500" in out and "TID 1501" in out
    assert "Imaging Measurement Report" in out
    assert "Verification Flag   : UNVERIFIED" in out
    assert '"Device Observer UID"' in out
    assert '"Algorithm Name"' in out and '"Source of Measurement"' in out
    assert "AI-generated content: must be reviewed by a physician before clinical use." in out
    if text and len(text) < 1000:
        assert text in out
    if "test_model" in case or case == "cxr_empty_text":
        assert "TEST MODEL" in out


@pytest.mark.parametrize("case", ["cxr_rg1_test_model", "ct_133_medgemma", "cxr_non_ascii"])
def test_dsr2html_renders(case, written, require_tool):
    dsr2html = require_tool("dsr2html")
    path, text = written[case]
    run = run_tool(dsr2html, str(path))
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    assert "AI-generated content" in run.stdout
    if case == "cxr_non_ascii":
        assert "Herzgröße" in run.stdout and "心脏大小正常" in run.stdout
