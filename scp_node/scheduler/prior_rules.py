"""Which earlier study a series is read against: the rules, with no database and no network.

Why a module of its own: the node (scp_node.scheduler.priors, over the index and the PACS) and
``scp-node analyze`` (over the files it is given) must choose the same prior by the same rules.

The rules (each a function below, so a test can name the one it checks):

* **Same person**: Patient ID equal and not empty, and Issuer of Patient ID equal (both empty
  counts as equal; one empty and one not does not).  Then, from the two studies' headers:
  Patient's Sex and Patient's Birth Date, where both studies have a value, must agree
  (:func:`identity_conflict`); otherwise the comparison stops and the reason is kept.
* **Comparable series**: the same modality family -- CR and DX are one family (chest radiograph),
  CT and MR each their own; nothing else is compared.  For CR/DX the prior must be a frontal
  chest view: View Position PA or AP with Body Part Examined CHEST or empty, or no View Position
  with Body Part Examined CHEST.  For CT/MR the Body Part Examined must be the same
  (case-insensitive); where both are empty, the Series Descriptions must be the same and not
  empty.  Where both series name a body part, they must name the same one, whatever the modality.
* **Earlier**: Study Date strictly before the current study's; on the same day only when both
  studies have a Study Time and the prior's is earlier.  A study without a date is never a prior,
  and a current study without a date gets none.
* **Recent enough**: at most ``lookback_days`` before the current study.
* **Most recent wins**: the latest (date, time); among series of that study the first given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Iterable

#: Modality -> family; modalities missing here are never compared.
FAMILIES = {"CR": "chest radiograph", "DX": "chest radiograph", "CT": "CT", "MR": "MR"}
FRONTAL_VIEWS = frozenset({"PA", "AP"})
CHEST = "CHEST"


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at, read from the index and a header, a C-FIND answer, or a file."""

    study_instance_uid: str
    series_instance_uid: str
    study_date: str = ""  #: DA, YYYYMMDD
    study_time: str = ""  #: TM, HHMMSS[.frac]
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    series_description: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_sex: str = ""
    patient_birth_date: str = ""


def _value(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def facts_from_header(ds: Any) -> SeriesFacts:
    """The facts of a pydicom data set (a header read with ``stop_before_pixels``)."""
    return SeriesFacts(**{name: _value(ds, keyword) for name, keyword in _KEYWORDS.items()})


_KEYWORDS = {"study_instance_uid": "StudyInstanceUID", "series_instance_uid": "SeriesInstanceUID",
             "study_date": "StudyDate", "study_time": "StudyTime", "modality": "Modality",
             "body_part_examined": "BodyPartExamined", "view_position": "ViewPosition",
             "series_description": "SeriesDescription", "patient_id": "PatientID",
             "issuer_of_patient_id": "IssuerOfPatientID", "patient_sex": "PatientSex",
             "patient_birth_date": "PatientBirthDate"}
#: Tags to read for :func:`facts_from_header` (``pydicom.dcmread(..., specific_tags=...)``).
HEADER_KEYWORDS: tuple[str, ...] = tuple(_KEYWORDS.values())


def family(modality: str) -> str:
    """The modality family ("" when the modality is never compared)."""
    return FAMILIES.get(modality.strip().upper(), "")


def parse_da(value: str) -> date | None:
    """A DICOM DA value as a date (None when missing or not a date)."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def interval_days(current_date: str, prior_date: str) -> int | None:
    """Current Study Date minus prior Study Date, in days (None when either is not a date)."""
    current, prior = parse_da(current_date), parse_da(prior_date)
    return None if current is None or prior is None else (current - prior).days


def same_patient_id(current: SeriesFacts, candidate: SeriesFacts) -> bool:
    """Patient ID (not empty) and Issuer of Patient ID are the same."""
    return bool(current.patient_id) and current.patient_id == candidate.patient_id \
        and current.issuer_of_patient_id == candidate.issuer_of_patient_id


def is_frontal_chest(facts: SeriesFacts) -> bool:
    view, part = facts.view_position.upper(), facts.body_part_examined.upper()
    return (view in FRONTAL_VIEWS and part in (CHEST, "")) or (not view and part == CHEST)


def comparable(current: SeriesFacts, candidate: SeriesFacts) -> bool:
    """Same modality family; a frontal chest view for CR/DX; the same body part for CT/MR."""
    fam = family(current.modality)
    if not fam or family(candidate.modality) != fam:
        return False
    cur_part, cand_part = current.body_part_examined.upper(), candidate.body_part_examined.upper()
    if cur_part and cand_part and cur_part != cand_part:
        return False
    if fam == FAMILIES["CR"]:
        return is_frontal_chest(candidate)
    if cur_part or cand_part:
        return cur_part == cand_part
    description = current.series_description.strip().upper()
    return bool(description) and description == candidate.series_description.strip().upper()


def is_earlier(current: SeriesFacts, candidate: SeriesFacts) -> bool:
    """A strictly earlier date, or the same date with an earlier time (both times known)."""
    cur, cand = parse_da(current.study_date), parse_da(candidate.study_date)
    if cur is None or cand is None:
        return False
    if cand != cur:
        return cand < cur
    cur_time, cand_time = _tm(current.study_time), _tm(candidate.study_time)
    return cur_time is not None and cand_time is not None and cand_time < cur_time


def _tm(value: str) -> str | None:
    """TM as a sortable string: HHMMSS.ffffff (None when missing or not a time)."""
    text = value.strip().replace(":", "")
    head, _, frac = text.partition(".")
    if not head.isdigit() or len(head) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    return head.ljust(6, "0") + "." + frac.ljust(6, "0")[:6]


def within_lookback(current: SeriesFacts, candidate: SeriesFacts, lookback_days: int) -> bool:
    days = interval_days(current.study_date, candidate.study_date)
    return days is not None and 0 <= days <= lookback_days


def eligible(current: SeriesFacts, candidate: SeriesFacts, lookback_days: int) -> bool:
    """Every rule but identity: another study of the same Patient ID, comparable, earlier, recent."""
    return (candidate.study_instance_uid != current.study_instance_uid
            and same_patient_id(current, candidate) and comparable(current, candidate)
            and is_earlier(current, candidate) and within_lookback(current, candidate, lookback_days))


def choose_prior(current: SeriesFacts, candidates: Iterable[SeriesFacts], lookback_days: int) -> SeriesFacts | None:
    """The most recent eligible candidate (None when there is none).  Identity is checked after
    (:func:`identity_conflict`): a conflict stops the comparison, it does not pick an older study."""
    best: SeriesFacts | None = None
    best_key: tuple[str, str] | None = None
    for cand in candidates:
        if not eligible(current, cand, lookback_days):
            continue
        key = (cand.study_date, _tm(cand.study_time) or "")
        if best_key is None or key > best_key:
            best, best_key = cand, key
    return best


def identity_conflict(current: SeriesFacts, prior: SeriesFacts) -> str:
    """Why the two studies cannot be the same person ("" when nothing disagrees): Patient's Sex or
    Birth Date, compared only where both studies have a value.  Never the values themselves."""
    differ = []
    if current.patient_sex and prior.patient_sex and current.patient_sex.upper() != prior.patient_sex.upper():
        differ.append("sex")
    if current.patient_birth_date and prior.patient_birth_date \
            and current.patient_birth_date != prior.patient_birth_date:
        differ.append("birth date")
    if not differ:
        return ""
    return " and ".join(differ) + (" differ" if len(differ) > 1 else " differs")

