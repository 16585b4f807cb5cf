"""``scp-node analyze PATH... --out DIR``: the analysis pipeline over folders, without the network.

Why: researchers want the node's exact preprocessing, model and SR output over a folder of studies
without running a PACS. Files are grouped into series by SeriesInstanceUID (folders are searched
recursively), each series is analysed (in batches of ``engine.max_batch``), and DIR receives one SR
plus its JSON findings per analysed series, ``results.csv`` (one row per series and per file that
is not DICOM) and ``findings.json``. A bad file or series is listed with its reason; the run goes on.
Nothing patient-identifying is printed: series are named by their UIDs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import click

from ..logs import configure as setup_logging
from . import load_config, main

CSV_COLUMNS = ("file_or_series", "path", "modality", "triage", "impression", "status", "reason", "sr_file")


@dataclass
class SeriesFiles:
    """The files of one series, as found on disk (duplicate SOP Instance UIDs dropped)."""

    series_uid: str
    modality: str
    paths: list[Path] = field(default_factory=list)
    sop_uids: set[str] = field(default_factory=set)
    duplicates: int = 0


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def group_series(paths: Iterable[Path]) -> tuple[list[SeriesFiles], list[tuple[Path, str]]]:
    """(series in first-seen order, [(file, reason)] for files that are not usable DICOM)."""
    import pydicom

    series: dict[str, SeriesFiles] = {}
    rejected: list[tuple[Path, str]] = []
    for path in _walk(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "Modality"])
        except Exception as exc:  # noqa: BLE001 - any file may sit in a research folder
            rejected.append((path, f"not DICOM ({type(exc).__name__})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            rejected.append((path, "DICOM without a Series Instance UID"))
            continue
        entry = series.setdefault(uid, SeriesFiles(uid, str(ds.get("Modality", "") or "")))
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in entry.sop_uids:
            entry.duplicates += 1  # the same instance in another encoding: analyse it once
            continue
        entry.sop_uids.add(sop)
        entry.paths.append(path)
    return list(series.values()), rejected


def _engine(config_path: Path | None, overrides: dict[str, Any]) -> Any:
    from ..config import Config
    from ..engine.medgemma import MedGemmaEngine
    from ..engine.schema import engine_bounds

    e = load_config(config_path).engine if config_path else Config().engine
    values = {k: v for k, v in overrides.items() if v is not None}
    e = dataclasses.replace(e, **values)
    return MedGemmaEngine(e.model_dir, device=e.device, max_new_tokens=e.max_new_tokens,
                          ct_max_slices=e.ct_max_slices, prompt_profiles=e.prompts or None,
                          structured=e.structured, answer_mode=e.answer_mode, thinking=e.thinking,
                          language=e.language, max_batch=e.max_batch,
                          compile=e.compile, schema_bounds=engine_bounds(e))


def _report(series: SeriesFiles, result: Any, out: Path, node: Any) -> tuple[Path, dict[str, Any]]:
    """Build and write the SR and its JSON findings; returns (SR path, findings dict)."""
    import pydicom

    from ..report import build_measurement_report, findings_json, write_report

    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.paths]
    sr = build_measurement_report(evidence, result, node=node)
    sr_path = out / "sr" / f"{series.series_uid}.dcm"
    sr_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(sr, sr_path)
    findings = findings_json(sr, result)
    if "structured" not in findings:
        findings["structured"] = dataclasses.asdict(result.structured) if result.structured else None
        findings["parse_error"] = result.parse_error
        findings["language"] = result.language
    sr_path.with_suffix(".json").write_text(json.dumps(findings, indent=2, ensure_ascii=False), encoding="utf-8")
    return sr_path, findings


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the SRs, results.csv and findings.json.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML configuration ([engine] is used); defaults apply without one.")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="MedGemma weights folder (overrides [engine] model_dir).")
@click.option("--device", default=None, help="auto, cpu or cuda[:N].")
@click.option("--ct-max-slices", type=click.IntRange(min=1), default=None)
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=None, help="Series per batch.")
@click.option("--language", type=click.Choice(["en", "zh"]), default=None)
@click.option("--max-findings", type=click.IntRange(min=1), default=None)
@click.option("--max-text-chars", type=click.IntRange(min=1), default=None)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Cap on the free-text answer (each prompt profile's budget applies below it).")
@click.option("--answer-mode", type=click.Choice(["report", "structured", "free"]), default=None,
              help="report: report then extraction (default); structured: one JSON answer; free: no grammar.")
@click.option("-v", "--verbose", is_flag=True)
def analyze(paths: tuple[Path, ...], out: Path, config_path: Path | None, model_dir: Path | None,
            device: str | None, ct_max_slices: int | None, max_batch: int | None, language: str | None,
            max_findings: int | None, max_text_chars: int | None, max_new_tokens: int | None,
            answer_mode: str | None, verbose: bool) -> None:
    """Analyse every series under PATH... and write SRs, results.csv and findings.json to --out."""
    setup_logging(verbose)
    if not verbose:
        import logging

        for name in ("scp_node", "highdicom", "pydicom"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from .. import __version__
    from ..engine.modeldir import ModelDirError
    from ..engine.preprocess import SeriesSkipped
    from ..report import ReportingNode

    overrides = dict(model_dir=model_dir.resolve() if model_dir else None, device=device,
                     ct_max_slices=ct_max_slices, max_batch=max_batch, language=language,
                     max_findings=max_findings, max_text_chars=max_text_chars, max_new_tokens=max_new_tokens,
                     answer_mode=answer_mode)
    engine = _engine(config_path, overrides)
    try:
        engine.load()
    except ModelDirError as exc:
        click.echo(f"scp-node analyze: {exc}", err=True)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    series, rejected = group_series(paths)
    click.echo(f"{len(series)} series, {len(rejected)} other file(s); model {engine.identity.name}", err=True)
    node = ReportingNode(ae_title="SCPNODE", station_name="ANALYZE", software_version=__version__)
    rows: list[dict[str, str]] = [
        dict(file_or_series="file", path=str(p), status="ignored", reason=why) for p, why in rejected
    ]
    all_findings: list[dict[str, Any]] = []
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with click.progressbar(length=len(series), label="analysing", file=sys.stderr) as bar:
        for start in range(0, len(series), engine.max_batch):
            chunk = series[start:start + engine.max_batch]
            try:
                results = engine.analyse_batch([s.paths for s in chunk])
            except Exception as exc:  # noqa: BLE001 - the engine returns per-series errors; be safe anyway
                results = [exc] * len(chunk)
            for entry, result in zip(chunk, results):
                row = dict(file_or_series=entry.series_uid, path=str(entry.paths[0].parent),
                           modality=entry.modality)
                try:
                    if isinstance(result, BaseException):
                        raise result
                    sr_path, findings = _report(entry, result, out, node)
                except SeriesSkipped as exc:
                    row.update(status="skipped", reason=exc.reason)
                except Exception as exc:  # noqa: BLE001 - listed, and the run goes on
                    row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
                else:
                    structured = result.structured
                    row.update(modality=result.modality, status="done", sr_file=str(sr_path.relative_to(out)),
                               triage=structured.triage if structured else "",
                               impression=structured.impression if structured else result.findings_text[:300],
                               reason=result.parse_error)
                    all_findings.append(findings)
                if entry.duplicates and row.get("status") == "done":
                    row["reason"] = (row.get("reason", "") + f" {entry.duplicates} duplicate instance(s) ignored").strip()
                counts[row["status"]] += 1
                rows.append(row)
            bar.update(len(chunk))
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in CSV_COLUMNS} for row in rows)
    (out / "findings.json").write_text(json.dumps(all_findings, indent=2, ensure_ascii=False), encoding="utf-8")
    click.echo(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}, "
               f"other files {len(rejected)}; results in {out}", err=True)
