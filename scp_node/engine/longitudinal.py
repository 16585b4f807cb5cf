"""Longitudinal comparison: a prior study and the current series go to the model together.

Why this layout: MedGemma 1.5 was trained for longitudinal chest X-ray comparison (MS-CXR-T), and
Google's ``notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb`` (Google-Health/medgemma)
shows how it is asked: ONE user turn, the earlier image first, the later image second, the question
last ("Compare the two above images. Is the pneumonia unchanged, worsened, or improved in the second
image compared to the first image?"), no system instruction, greedy, ``max_new_tokens=300``, both
images padded to a square. The node keeps that order and the question-last rule, and adds what the
notebook leaves to the reader:

* a header with the study date before each study's images, "PRIOR STUDY (2025-03-04):" and
  "CURRENT STUDY (2026-03-04):" (the notebook's images carry no labels; the question names them);
* CT/MR: the CT notebook's "SLICE k" after each image; the prior's slices are "PRIOR SLICE k", the
  current's keep "SLICE k", so that a finding's slice (and the schema's 1..n) still indexes the
  current series' sources (``AnalysisResult.sources``); the prior's images are only in
  ``Comparison.prior_sources``;
* the comparison question after the profile's own question, and the answer's "change" per finding
  and "comparison" sentence (:func:`.schema.findings_schema` ``compared``).

Slice budget (CT/MR): both volumes together stay within ``ct_max_slices`` / ``mr_max_slices`` (85,
MedGemma 1.5's volume training limit). The prior is prepared first with at most ``N // 2`` slices
(42 of 85), the current series gets the rest, ``N - len(prior)`` (at least 43): the current series,
which the report is about, always has the larger share. CR/DX: one frontal image each (ViewPosition
PA or AP when the header says so, else the first image by Instance Number), as the notebook's pair,
prepared with the node's CXR recipe (VOI LUT, MONOCHROME1 inverted, zero-padded square, 896x896).

A prior whose images cannot be prepared (unreadable, another modality) costs the comparison, never
the analysis: the current series is analysed as without a prior and the result says
``Comparison(status="not_comparable", reason=...)``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .preprocess import XRAY_MODALITIES, PreparedSeries, prepare_series
from .prompts import PromptProfile, answer_format, build_messages, localisation_for, render, system_text
from .result import Comparison, PriorStudy
from .schema import SchemaBounds, findings_schema, max_answer_tokens

#: Views of a frontal chest X-ray (DICOM ViewPosition).
FRONTAL_VIEWS = ("PA", "AP")
#: Follows the profile's question when a prior is compared (the notebook's "Compare the two above
#: images ... in the second image compared to the first image", for every finding).
COMPARISON_QUESTION = (
    "Compare the CURRENT study with the PRIOR study above{interval}: for each finding, say whether it is "
    "new, improved, stable or worsened in the current study compared to the prior, or resolved (seen on "
    "the prior, gone now).{slices}"
)
_SLICES_NOTE = " Slice numbers (SLICE k) are those of the CURRENT study."


@dataclass
class PriorInput:
    """The prepared prior that goes into the model input beside the current series."""

    prior: PriorStudy
    prepared: PreparedSeries  #: the prior's images (labels "PRIOR SLICE k" for volumes)
    current_date: str = ""  #: DICOM DA of the current study ("" when unknown)
    interval_days: int | None = None

    def comparison(self) -> Comparison:
        """What the result says: compared with this prior, and which of its images were used."""
        return Comparison(status="compared", prior_study_instance_uid=self.prior.study_instance_uid,
                          prior_series_instance_uid=self.prior.series_instance_uid,
                          prior_study_date=self.prior.study_date, interval_days=self.interval_days,
                          source=self.prior.source, prior_sources=list(self.prepared.sources))


def readable_date(da: str) -> str:
    """DICOM DA "20250304" -> "2025-03-04"; anything else -> "date unknown"."""
    parsed = _date(da)
    return parsed.isoformat() if parsed else "date unknown"


def _date(da: str) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(str(da).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _header(path: Path | str, *keywords: str) -> dict[str, str]:
    """Some header values of one file ({} when it cannot be read: the caller falls back)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    except Exception:  # noqa: BLE001 - a header we cannot read only costs the preference it feeds
        return {}
    return {k: str(ds.get(k, "") or "").strip() for k in keywords}


def frontal_paths(paths: Sequence[Path | str]) -> list[Path | str]:
    """CR/DX: the files whose ViewPosition is PA or AP when any is; otherwise all (CT/MR: all)."""
    if not paths or _header(paths[0], "Modality").get("Modality", "").upper() not in XRAY_MODALITIES:
        return list(paths)
    frontal = [p for p in paths if _header(p, "ViewPosition").get("ViewPosition", "").upper() in FRONTAL_VIEWS]
    return frontal or list(paths)


def _same_kind(a: str, b: str) -> bool:
    """CR and DX are both chest radiographs; CT compares with CT, MR with MR."""
    return a == b or (a in XRAY_MODALITIES and b in XRAY_MODALITIES)


def prepare_with_prior(
    paths: Sequence[Path | str], prior: PriorStudy | None, *, image_size: int | None, ct_max_slices: int,
    mr_max_slices: int,
) -> tuple[PreparedSeries, PriorInput | None, Comparison | None]:
    """The current series, the prior beside it (None: none or not usable) and, for a prior that was
    given but cannot be used, the ``not_comparable`` comparison. Raises SeriesSkipped only for the
    current series (as :func:`.preprocess.prepare_series`)."""

    def alone() -> PreparedSeries:
        return prepare_series(paths, image_size=image_size, ct_max_slices=ct_max_slices, mr_max_slices=mr_max_slices)

    if prior is None:
        return alone(), None, None
    try:
        if not prior.paths:
            raise ValueError("the prior series has no files")
        before = prepare_series(frontal_paths(prior.paths), image_size=image_size, ct_max_slices=max(1, ct_max_slices // 2),
                                mr_max_slices=max(1, mr_max_slices // 2), xray_max_images=1)
    except Exception as exc:  # noqa: BLE001 - SeriesSkipped or a data error: the comparison is lost, not the job
        reason = getattr(exc, "reason", "") or f"{type(exc).__name__}: {exc}"
        return alone(), None, Comparison(status="not_comparable", reason=f"prior images could not be read: {reason}"[:300],
                                         **_prior_ids(prior))
    n_prior = len(before.images)
    current = prepare_series(frontal_paths(paths), image_size=image_size, ct_max_slices=max(1, ct_max_slices - n_prior),
                             mr_max_slices=max(1, mr_max_slices - n_prior), xray_max_images=1)
    if not _same_kind(before.modality, current.modality):
        return alone(), None, Comparison(
            status="not_comparable", reason=f"the prior is {before.modality}, the current series {current.modality}",
            **_prior_ids(prior))
    if before.is_volume:
        before.labels = [f"PRIOR {label}" for label in before.labels]
    current_date = _header(paths[0], "StudyDate").get("StudyDate", "")
    interval = prior.interval_days
    first, second = _date(prior.study_date), _date(current_date)
    if second is None and first is not None and interval is not None:
        current_date = (first + _dt.timedelta(days=interval)).strftime("%Y%m%d")
    elif interval is None and first is not None and second is not None:
        interval = (second - first).days
    return current, PriorInput(prior, before, current_date, interval), None


def _prior_ids(prior: PriorStudy) -> dict[str, Any]:
    return dict(prior_study_instance_uid=prior.study_instance_uid,
                prior_series_instance_uid=prior.series_instance_uid, prior_study_date=prior.study_date,
                interval_days=prior.interval_days, source=prior.source)


def _add_text(content: list[dict[str, Any]], text: str) -> None:
    """Append a text item; one right after another text is joined to it with a blank line (the Gemma
    3 template trims each item and glues them: "SLICE 42" + "CURRENT ..." would read "SLICE 42CURRENT")."""
    if content and content[-1]["type"] == "text":
        content[-1] = {"type": "text", "text": f"{content[-1]['text']}\n\n{text}"}
    else:
        content.append({"type": "text", "text": text})


def comparison_question(pair: PriorInput, volume: bool) -> str:
    interval = f", {pair.interval_days} days earlier" if pair.interval_days is not None else ""
    return COMPARISON_QUESTION.format(interval=interval, slices=_SLICES_NOTE if volume else "")


def longitudinal_messages(
    prepared: PreparedSeries, pair: PriorInput, profile: PromptProfile, *, structured: bool = False,
    language: str = "en", thinking: bool = False, localisation: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages with the prior first and the current series second, the question last.

    [system,] one user turn: the instruction; "PRIOR STUDY (date):", the prior's image(s) (volumes:
    each followed by "PRIOR SLICE k"); "CURRENT STUDY (date):", the current image(s) (volumes: each
    followed by "SLICE k"); then, after a blank line, the profile's question, the comparison question
    and the answer format. A volume's blank line is written inside the last "SLICE k" item (as
    :func:`.prompts.build_messages` does); after an image the processor's own image text ends with
    one ("<end_of_image>\\n\\n").
    """
    n = len(prepared.images)
    localisation = localisation or localisation_for(prepared.modality)
    messages: list[dict[str, Any]] = []
    system = system_text(prepared, profile, thinking)
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content: list[dict[str, Any]] = []
    instruction = render(profile.instruction, prepared, profile).strip()
    if instruction:
        _add_text(content, instruction)
    question = render(profile.question, prepared, profile).strip()
    if question and question[-1] not in ".?!。？！":
        question += "."  # "Describe this X-ray" (the quick start's question) is followed by a sentence
    question = f"{question} {comparison_question(pair, prepared.is_volume and n > 1)}".strip()
    question += answer_format(n, structured, language, localisation, compared=True)
    for header, series in ((f"PRIOR STUDY ({readable_date(pair.prior.study_date)}):", pair.prepared),
                           (f"CURRENT STUDY ({readable_date(pair.current_date)}):", prepared)):
        _add_text(content, header)
        label = profile.label_images and len(series.images) > 1
        for image, text in zip(series.images, series.labels):
            content.append({"type": "image", "image": image})
            if label:
                _add_text(content, text)
    _add_text(content, question)
    messages.append({"role": "user", "content": content})
    return messages


@dataclass(frozen=True)
class Conversation:
    """The first turn of one series and what its structured answer must look like."""

    messages: list[dict[str, Any]]
    schema: dict[str, Any]  #: the findings schema (the "structured" answer, or "report" mode's extraction)
    answer_limit: int  #: tokens the longest answer under ``schema`` can take
    localisation: str
    compared: bool  #: a prior is in the input (the answer has "change" and "comparison")


def conversation(prepared: PreparedSeries, profile: PromptProfile, pair: PriorInput | None, *, answer_mode: str,
                 language: str, thinking: bool, bounds: SchemaBounds) -> Conversation:
    """The conversation of one series in an answer mode, with or without a prior; both backends use it,
    so that the embedded engine and the served model get the same messages for the same input.

    "report": the free-text report (thinking as configured); "structured": the JSON prompt, no thinking
    (the grammar leaves no room for a trace); "free": the JSON prompt, thinking as configured.
    """
    n = len(prepared.images)
    localisation = localisation_for(prepared.modality)
    compared = pair is not None
    structured = answer_mode != "report"
    think = thinking and answer_mode != "structured"
    if pair is None:
        messages = build_messages(prepared, profile, structured=structured, language=language, thinking=think)
    else:
        messages = longitudinal_messages(prepared, pair, profile, structured=structured, language=language,
                                         thinking=think, localisation=localisation)
    return Conversation(messages, findings_schema(bounds, language, n, localisation, compared),
                        max_answer_tokens(bounds, language, n, localisation, compared), localisation, compared)


__all__ = ["COMPARISON_QUESTION", "Conversation", "FRONTAL_VIEWS", "PriorInput",
           "conversation", "frontal_paths", "longitudinal_messages", "prepare_with_prior", "readable_date"]
