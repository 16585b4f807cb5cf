"""Prompt profiles (instruction + question per modality) and the chat messages built from them.

Why data: radiologists will want to tune wording per site without touching code, so profiles are plain
dicts that can later be loaded from the node's configuration. The message *layout* follows MedGemma
1.5's recipes and is code: instruction first, then every image (CT/MR: each followed by its
"SLICE k" label; a single image gets no label), then the question **last**.

Placeholders usable in ``instruction`` and ``question``: ``{body_part}`` ("chest"),
``{of_body_part}`` (" of the chest" or ""), ``{modality}`` ("CT") and ``{n_images}`` ("85").

Profiles come from ``[engine.prompts.<name>]`` tables in the config (keys: ``modalities``, optional
``body_parts`` (BodyPartExamined codes), ``instruction``, ``question``, ``label_images``,
``default_body_part``, ``language`` "en"/"zh"); configured profiles are tried first, then the defaults
below that they do not replace by name. A profile naming body parts wins over one that names none.
In structured mode a fixed answer-format paragraph (JSON keys, language) follows the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .schema import LANGUAGES

if TYPE_CHECKING:  # keeps this module free of pydicom/PIL imports at run time
    from .preprocess import PreparedSeries

#: Default profiles; keys are profile names (they end up in AnalysisResult.prompt_profile).
DEFAULT_PROMPT_PROFILES: dict[str, dict[str, Any]] = {
    "cxr-report": {
        "modalities": ["CR", "DX"],
        "default_body_part": "chest",
        "label_images": False,
        "instruction": "You are an expert radiologist.",
        "question": (
            "Describe this {body_part} X-ray. Write the findings and then a short impression, "
            "in the style of a radiology report."
        ),
    },
    "ct-volume": {
        "modalities": ["CT"],
        "default_body_part": "",
        "label_images": True,
        "instruction": (
            "You are an expert radiologist. You are reviewing a CT scan{of_body_part}. "
            "The {n_images} axial slices below are in order along the body; each slice is followed by its "
            "label. Please review the slices provided below carefully."
        ),
        "question": (
            "Based on the visual evidence in the slices provided above, write a concise radiology report "
            "with findings and an impression. Report only what is visible in these slices."
        ),
    },
    "mr-volume": {
        "modalities": ["MR"],
        "default_body_part": "",
        "label_images": True,
        "instruction": (
            "You are an expert radiologist. You are reviewing an MRI series{of_body_part}. "
            "The {n_images} slices below are in order through the volume; each slice is followed by its "
            "label. Please review the slices provided below carefully."
        ),
        "question": (
            "Based on the visual evidence in the slices provided above, write a concise radiology report "
            "with findings and an impression. Report only what is visible in these slices."
        ),
    },
}


@dataclass(frozen=True)
class PromptProfile:
    """A validated prompt profile."""

    name: str
    modalities: tuple[str, ...]
    instruction: str
    question: str
    label_images: bool = False
    default_body_part: str = ""
    body_parts: tuple[str, ...] = ()  #: BodyPartExamined codes (upper case); empty: any body part
    language: str | None = None  #: "en" or "zh"; None: the engine's language

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> "PromptProfile":
        """Build from a config-style dict; raises ValueError naming the missing or bad key."""
        for key in ("instruction", "question"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ValueError(f"prompt profile {name!r}: {key!r} must be a non-empty string")
        unknown = set(data) - _PROFILE_KEYS
        if unknown:
            raise ValueError(f"prompt profile {name!r}: unknown key(s) {sorted(unknown)} (known: {sorted(_PROFILE_KEYS)})")
        for key in ("modalities", "body_parts"):
            value = data.get(key, [])
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"prompt profile {name!r}: {key!r} must be a list of strings")
        if not data.get("modalities"):
            raise ValueError(f"prompt profile {name!r}: 'modalities' must name at least one modality")
        language = data.get("language")
        if language is not None and language not in LANGUAGES:
            raise ValueError(f"prompt profile {name!r}: language must be one of {LANGUAGES}, not {language!r}")
        if not isinstance(data.get("label_images", False), bool):
            raise ValueError(f"prompt profile {name!r}: 'label_images' must be true or false")
        return cls(
            name=name,
            modalities=tuple(str(m).upper() for m in data.get("modalities", ())),
            instruction=data["instruction"],
            question=data["question"],
            label_images=bool(data.get("label_images", False)),
            default_body_part=str(data.get("default_body_part", "")),
            body_parts=tuple(_body_code(b) for b in data.get("body_parts", ())),
            language=language,
        )


_PROFILE_KEYS = frozenset(
    {"modalities", "body_parts", "instruction", "question", "label_images", "default_body_part", "language"}
)


def _body_code(value: str) -> str:
    return "".join(ch for ch in str(value).upper() if ch.isalnum())


def merged_profiles(configured: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Configured profiles first (in file order), then the defaults they do not replace by name."""
    merged: dict[str, Mapping[str, Any]] = dict(configured or {})
    for name, data in DEFAULT_PROMPT_PROFILES.items():
        merged.setdefault(name, data)
    return merged


def validate_profiles(profiles: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first bad profile (used when the config is loaded)."""
    if not isinstance(profiles, Mapping):
        raise ValueError("prompt profiles must be a table of tables ([engine.prompts.<name>])")
    for name, data in profiles.items():
        if not isinstance(data, Mapping):
            raise ValueError(f"prompt profile {name!r} must be a table ([engine.prompts.{name}])")
        PromptProfile.from_mapping(str(name), data)


def profile_for_modality(
    modality: str, profiles: Mapping[str, Mapping[str, Any]] | None = None, body_part: str = ""
) -> PromptProfile:
    """The profile for ``modality``: first one that also lists ``body_part``, else the first that
    names no body part. ``profiles=None`` means the defaults; KeyError when none fits."""
    profiles = DEFAULT_PROMPT_PROFILES if profiles is None else profiles
    code = _body_code(body_part)
    generic: PromptProfile | None = None
    for name, data in profiles.items():
        if modality.upper() not in [str(m).upper() for m in data.get("modalities", ())]:
            continue
        profile = PromptProfile.from_mapping(name, data)
        if profile.body_parts:
            if code and code in profile.body_parts:
                return profile
        elif generic is None:
            generic = profile
    if generic is not None:
        return generic
    raise KeyError(f"no prompt profile for modality {modality!r}")


class _KeepUnknown(dict):
    """format_map helper: unknown placeholders stay as written instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, prepared: "PreparedSeries", profile: PromptProfile) -> str:
    """Fill the placeholders of one profile text for this series."""
    from .preprocess import readable_body_part  # local: keeps prompts importable without pydicom

    body_part = readable_body_part(prepared.body_part) or profile.default_body_part
    values = _KeepUnknown(
        body_part=body_part or "",
        of_body_part=f" of the {body_part}" if body_part else "",
        modality=prepared.modality,
        n_images=str(len(prepared.images)),
    )
    return template.format_map(values)


_ANSWER_FORMAT = (
    "Answer with one JSON object only, with these keys: "
    '"findings" (a list; each item has "finding_type" (one of: {finding_types}), "location", "description", '
    '"size_mm" (a number or null), "box_2d" ([y0, x0, y1, x1] on a 0-1000 grid of the image, or null) and '
    '"image_index" ({image_index})), "impression", "recommendation", '
    '"image_quality" ("adequate", or "limited" when the image is not interpretable: over-exposed, motion, '
    'cropped) and "triage" ("normal", "abnormal" or "urgent").'
)
_LANGUAGE_LINE = {
    ("en", True): "",
    ("zh", True): " Write the text values in Simplified Chinese; keep the keys and the listed values in English.",
    ("en", False): "",
    ("zh", False): " Write the report in Simplified Chinese.",
}


def answer_format(n_images: int, structured: bool, language: str = "en") -> str:
    """What follows the question: the JSON answer format (structured mode) and the language."""
    from .result import FINDING_TYPES  # light module

    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    text = ""
    if structured:
        index = (f"the 1-based number of the slice the box is on, 1 to {n_images}, or null" if n_images > 1
                 else "null")
        text = " " + _ANSWER_FORMAT.format(finding_types=", ".join(FINDING_TYPES), image_index=index)
    return text + _LANGUAGE_LINE[(language, structured)]


def build_messages(
    prepared: "PreparedSeries", profile: PromptProfile, *, structured: bool = False, language: str = "en"
) -> list[dict[str, Any]]:
    """Gemma 3 chat messages: one user turn with instruction, images (+ labels), question last.

    ``structured`` appends the JSON answer format to the question; ``language`` ("zh") asks for
    Chinese text. Both default to the plain English free-text prompt."""
    content: list[dict[str, Any]] = [{"type": "text", "text": render(profile.instruction, prepared, profile)}]
    label = profile.label_images and len(prepared.images) > 1
    for image, text in zip(prepared.images, prepared.labels):
        content.append({"type": "image", "image": image})
        if label:
            content.append({"type": "text", "text": text})
    question = render(profile.question, prepared, profile) + answer_format(len(prepared.images), structured, language)
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]
