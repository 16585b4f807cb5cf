"""``scp-node analyze PATH... --out DIR``: the analysis pipeline over folders, without the network.

Why: researchers want the node's exact preprocessing, model and SR output over a folder of studies
without running a PACS. Files are grouped into series by SeriesInstanceUID (folders are searched
recursively), each series is analysed (in batches of ``engine.max_batch``), and DIR receives one SR
plus its JSON findings per analysed series, ``results.csv`` (one row per series and per file that
is not DICOM) and ``findings.json``. A bad file or series is listed with its reason; the run goes on.
Nothing patient-identifying is printed: series are named by their UIDs.

Priors: each series is compared with the most recent earlier comparable series of the same patient
**among the files given** (the node's rules, scp_node.scheduler.prior_rules; no PACS is asked), and
the CSV says how: comparison status, the prior's series and date, the interval in days, and each
finding's change.  ``--no-priors`` analyses every series on its own.
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

CSV_COLUMNS = ("file_or_series", "path", "modality", "triage", "impression", "status", "reason", "sr_file",
               "comparison", "prior_series", "prior_study_date", "interval_days", "changes")


@dataclass
class SeriesFiles:
    """The files of one series, as found on disk (duplicate SOP Instance UIDs dropped)."""

    series_uid: str
    modality: str
    paths: list[Path] = field(default_factory=list)
    sop_uids: set[str] = field(default_factory=set)
    duplicates: int = 0
    facts: Any = None  #: the prior rules' SeriesFacts, from the first file's header


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def group_series(paths: Iterable[Path]) -> tuple[list[SeriesFiles], list[tuple[Path, str]]]:
    """(series in first-seen order, [(file, reason)] for files that are not usable DICOM)."""
    import pydicom

    from ..scheduler.prior_rules import HEADER_KEYWORDS, facts_from_header

    series: dict[str, SeriesFiles] = {}
    rejected: list[tuple[Path, str]] = []
    for path in _walk(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", *HEADER_KEYWORDS])
        except Exception as exc:  # noqa: BLE001 - any file may sit in a research folder
            rejected.append((path, f"not DICOM ({type(exc).__name__})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            rejected.append((path, "DICOM without a Series Instance UID"))
            continue
        entry = series.setdefault(uid, SeriesFiles(uid, str(ds.get("Modality", "") or "")))
        if entry.facts is None:
            try:
                entry.facts = facts_from_header(ds)
            except Exception:  # noqa: BLE001 - a header value pydicom cannot read: no prior for it
                entry.facts = None
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in entry.sop_uids:
            entry.duplicates += 1  # the same instance in another encoding: analyse it once
            continue
        entry.sop_uids.add(sop)
        entry.paths.append(path)
    return list(series.values()), rejected


def find_priors(series: list[SeriesFiles], lookback_days: int) -> dict[str, tuple[Any, Any]]:
    """For each series: (PriorStudy or None, Comparison), the prior chosen among the other given
    series by the node's rules; a sex or birth date that differs stops the comparison."""
    from ..engine.result import Comparison, PriorStudy
    from ..scheduler.prior_rules import choose_prior, identity_conflict, interval_days

    by_uid = {s.series_uid: s for s in series}
    facts = [s.facts for s in series if s.facts is not None]
    out: dict[str, tuple[Any, Any]] = {}
    for entry in series:
        chosen = choose_prior(entry.facts, facts, lookback_days) if entry.facts is not None else None
        if chosen is None:
            out[entry.series_uid] = (None, Comparison(status="none", reason="no earlier comparable study of this "
                                                                            "patient among the files given"))
            continue
        conflict = identity_conflict(entry.facts, chosen)
        if conflict:
            out[entry.series_uid] = (None, Comparison(status="not_comparable", source="files",
                                                      reason=f"prior not comparable: {conflict}"))
            continue
        days = interval_days(entry.facts.study_date, chosen.study_date)
        prior = PriorStudy(study_instance_uid=chosen.study_instance_uid, series_instance_uid=chosen.series_instance_uid,
                           study_date=chosen.study_date, paths=tuple(str(p) for p in by_uid[chosen.series_instance_uid].paths),
                           source="files", interval_days=days)
        out[entry.series_uid] = (prior, Comparison(
            status="compared", prior_study_instance_uid=chosen.study_instance_uid,
            prior_series_instance_uid=chosen.series_instance_uid, prior_study_date=chosen.study_date,
            interval_days=days, source="files"))
    return out


def _comparison_columns(result: Any) -> dict[str, str]:
    """The CSV's comparison, prior_series, prior_study_date, interval_days and changes
    ("finding_type: change; ..." for the findings that carry a change)."""
    c = result.comparison
    if c is None:
        return {}
    findings = result.structured.findings if result.structured is not None else ()
    return dict(comparison=c.status + (f" ({c.reason})" if c.reason and c.status != "compared" else ""),
                prior_series=c.prior_series_instance_uid, prior_study_date=c.prior_study_date,
                interval_days="" if c.interval_days is None else str(c.interval_days),
                changes="; ".join(f"{f.finding_type}: {f.change}" for f in findings if f.change))


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
    if result.comparison is not None and "comparison" not in findings:
        findings["comparison"] = dataclasses.asdict(result.comparison)
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
@click.option("--no-priors", is_flag=True,
              help="Do not compare a series with an earlier study of the same patient among the files.")
@click.option("-v", "--verbose", is_flag=True)
def analyze(paths: tuple[Path, ...], out: Path, config_path: Path | None, model_dir: Path | None,
            device: str | None, ct_max_slices: int | None, max_batch: int | None, language: str | None,
            max_findings: int | None, max_text_chars: int | None, max_new_tokens: int | None,
            answer_mode: str | None, no_priors: bool, verbose: bool) -> None:
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
    lookback = load_config(config_path).scheduler.prior_lookback_days if config_path else 1825
    priors = {} if no_priors else find_priors(series, lookback)
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
            chunk_priors = [priors.get(s.series_uid, (None, None)) for s in chunk]
            try:
                if any(p is not None for p, _ in chunk_priors):
                    results = engine.analyse_batch([s.paths for s in chunk], priors=[p for p, _ in chunk_priors])
                else:
                    results = engine.analyse_batch([s.paths for s in chunk])
            except Exception as exc:  # noqa: BLE001 - the engine returns per-series errors; be safe anyway
                results = [exc] * len(chunk)
            for entry, result, (_, comparison) in zip(chunk, results, chunk_priors):
                row = dict(file_or_series=entry.series_uid, path=str(entry.paths[0].parent),
                           modality=entry.modality)
                try:
                    if isinstance(result, BaseException):
                        raise result
                    if result.comparison is None:  # the engine's own word on the prior wins
                        result.comparison = comparison
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
                               reason=result.parse_error, **_comparison_columns(result))
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
