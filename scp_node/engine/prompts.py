"""Prompt profiles (instruction + question per modality) and the chat messages built from them.

Why data: radiologists will want to tune wording per site without touching code, so profiles are plain
dicts that can be loaded from the node's configuration. The message *layout* and the default texts
follow Google's own MedGemma 1.5 recipes (Google-Health/medgemma):

* ``notebooks/high_dimensional_ct_hugging_face.ipynb`` (CT volumes, and the node's MR volumes): one
  user turn, the instruction text first ("... Please review the slices provided below carefully."),
  then each slice image followed by its "SLICE k" label (1-based), then the query, which starts with a
  blank line ("\n\nBased on the visual evidence in the slices provided above, ..."), **last**;
  ``max_new_tokens=2000``, greedy.
* ``notebooks/quick_start_with_hugging_face.ipynb`` (CXR): system instruction "You are an expert
  radiologist." and the question "Describe this X-ray"; 300 new tokens, 1300 when thinking.
  ``cxr_anatomy_localization_with_hugging_face.ipynb`` (1000 new tokens) and
  ``cxr_longitudinal_comparison_with_hugging_face.ipynb`` (prior image, current image, then the
  query; 300 new tokens) put the image(s) first and the query last, as the node does
  (:mod:`.longitudinal` builds the conversation with a prior).
* Thinking: Google's system instruction "SYSTEM INSTRUCTION: think silently if needed." switches it
  on; the trace is cut at ``<unused95>`` (:mod:`.thinking`), as the notebooks do.

The Gemma 3 chat template trims every text item (``item['text'] | trim``) and glues the items
together, so a query item that starts with "\n\n" loses its blank line and renders as
"...SLICE 85Based on ...". The node therefore writes the blank line *inside* one text item (the last
label and the query), where the template keeps it: the model sees the layout the notebook intends.

Placeholders usable in ``system``, ``instruction`` and ``question``: ``{body_part}`` ("chest"),
``{of_body_part}`` (" of the chest" or ""), ``{modality}`` ("CT"), ``{n_images}`` ("85") and
``{the_images}`` ("this image" / "these 3 images").

Profiles come from ``[engine.prompts.<name>]`` tables in the config (keys: ``modalities``, optional
``body_parts`` (BodyPartExamined codes), ``system``, ``instruction``, ``question``, ``label_images``,
``default_body_part``, ``language`` "en"/"zh", ``max_new_tokens`` (the report's budget) and
``max_images`` (the profile applies to series of at most that many images; 0: any)); configured
profiles are tried first, then the defaults below that they do not replace by name. A profile naming
body parts wins over one that names none; one with a fitting ``max_images`` over one without.

Everything here is pure Python (no torch): the OpenAI-compatible HTTP backend builds the same
conversations (:func:`build_messages`, :func:`extraction_messages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .schema import LANGUAGES

if TYPE_CHECKING:  # keeps this module free of pydicom/PIL imports at run time
    from .preprocess import PreparedSeries

#: Google's system instruction that lets MedGemma think before answering (trace cut at <unused95>).
THINKING_INSTRUCTION = "SYSTEM INSTRUCTION: think silently if needed."
#: Extra new tokens for the trace when thinking (quick start notebook: 300 -> 1300).
THINKING_EXTRA_TOKENS = 1000
#: Report budgets: CT/MR as the CT notebook (2000), X-ray and 2D images 500 (between the quick
#: start's 300 and the localisation notebook's 1000: room for findings and an impression). A comparison
#: with a prior keeps these budgets: the longitudinal notebook answers its comparison in 300.
VOLUME_REPORT_TOKENS = 2000
IMAGE_REPORT_TOKENS = 500
#: Below this many images a CT/MR series is read as 2D images, not as a volume.
VOLUME_MIN_IMAGES = 5

_VOLUME_QUESTION = (
    "Based on the visual evidence in the slices provided above, write a radiology report of this "
    "{modality} with the findings and an impression. Give the slice number (SLICE k) of each finding."
)

#: Default profiles; keys are profile names (they end up in AnalysisResult.prompt_profile).
DEFAULT_PROMPT_PROFILES: dict[str, dict[str, Any]] = {
    "cxr-report": {  # quick_start_with_hugging_face.ipynb
        "modalities": ["CR", "DX"],
        "default_body_part": "chest",
        "label_images": False,
        "system": "You are an expert radiologist.",
        "instruction": "",
        "question": "Describe this X-ray",
        "max_new_tokens": IMAGE_REPORT_TOKENS,
    },
    "ct-volume": {  # high_dimensional_ct_hugging_face.ipynb
        "modalities": ["CT"],
        "default_body_part": "",
        "label_images": True,
        "instruction": (
            "You are an instructor teaching medical students. You are analyzing a contiguous block of "
            "CT slices{of_body_part}. Please review the slices provided below carefully."
        ),
        "question": _VOLUME_QUESTION,
        "max_new_tokens": VOLUME_REPORT_TOKENS,
    },
    "mr-volume": {  # the CT notebook's recipe for MR volumes
        "modalities": ["MR"],
        "default_body_part": "",
        "label_images": True,
        "instruction": (
            "You are an instructor teaching medical students. You are analyzing a contiguous block of "
            "MRI slices{of_body_part}. Please review the slices provided below carefully."
        ),
        "question": _VOLUME_QUESTION.replace("{modality}", "MRI"),
        "max_new_tokens": VOLUME_REPORT_TOKENS,
    },
    "ct-images": {  # a single slice, a scout, a few images: 2D images, read like the quick start's X-ray
        "modalities": ["CT"],
        "max_images": VOLUME_MIN_IMAGES - 1,
        "default_body_part": "",
        "label_images": True,
        "system": "You are an expert radiologist.",
        "instruction": "",
        "question": "Describe {the_images} from a CT{of_body_part}. Give the slice number of each finding.",
        "max_new_tokens": IMAGE_REPORT_TOKENS,
    },
    "mr-images": {
        "modalities": ["MR"],
        "max_images": VOLUME_MIN_IMAGES - 1,
        "default_body_part": "",
        "label_images": True,
        "system": "You are an expert radiologist.",
        "instruction": "",
        "question": "Describe {the_images} from an MRI{of_body_part}. Give the slice number of each finding.",
        "max_new_tokens": IMAGE_REPORT_TOKENS,
    },
}


@dataclass(frozen=True)
class PromptProfile:
    """A validated prompt profile."""

    name: str
    modalities: tuple[str, ...]
    instruction: str  #: first text of the user turn ("" for none)
    question: str  #: the query, last in the user turn
    label_images: bool = False
    default_body_part: str = ""
    body_parts: tuple[str, ...] = ()  #: BodyPartExamined codes (upper case); empty: any body part
    language: str | None = None  #: "en" or "zh"; None: the engine's language
    system: str = ""  #: system instruction ("" for none)
    max_new_tokens: int = 0  #: the free-text report's budget; 0: the engine's
    max_images: int = 0  #: applies to series of at most this many images; 0: any number

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> "PromptProfile":
        """Build from a config-style dict; raises ValueError naming the missing or bad key."""
        if not isinstance(data.get("question"), str) or not data["question"].strip():
            raise ValueError(f"prompt profile {name!r}: 'question' must be a non-empty string")
        for key in ("instruction", "system"):
            if not isinstance(data.get(key, ""), str):
                raise ValueError(f"prompt profile {name!r}: {key!r} must be a string")
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
        for key in ("max_new_tokens", "max_images"):
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"prompt profile {name!r}: {key!r} must be a whole number >= 0")
        return cls(
            name=name,
            modalities=tuple(str(m).upper() for m in data.get("modalities", ())),
            instruction=data.get("instruction", ""),
            question=data["question"],
            label_images=bool(data.get("label_images", False)),
            default_body_part=str(data.get("default_body_part", "")),
            body_parts=tuple(_body_code(b) for b in data.get("body_parts", ())),
            language=language,
            system=data.get("system", ""),
            max_new_tokens=int(data.get("max_new_tokens", 0)),
            max_images=int(data.get("max_images", 0)),
        )


_PROFILE_KEYS = frozenset(
    {"modalities", "body_parts", "system", "instruction", "question", "label_images", "default_body_part",
     "language", "max_new_tokens", "max_images"}
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
    modality: str, profiles: Mapping[str, Mapping[str, Any]] | None = None, body_part: str = "",
    n_images: int = 0,
) -> PromptProfile:
    """The profile for ``modality``, a series of ``n_images`` images (0: not known) and ``body_part``.

    Profiles limited to ``max_images`` apply only when the series has that many images or fewer.
    Among those that apply, one that lists ``body_part`` comes first, then one limited by
    ``max_images`` (more specific), then file order. ``profiles=None`` means the defaults; KeyError
    when none fits.
    """
    profiles = DEFAULT_PROMPT_PROFILES if profiles is None else profiles
    code = _body_code(body_part)
    best: tuple[tuple[int, int, int], PromptProfile] | None = None
    for order, (name, data) in enumerate(profiles.items()):
        if modality.upper() not in [str(m).upper() for m in data.get("modalities", ())]:
            continue
        profile = PromptProfile.from_mapping(name, data)
        if profile.body_parts and not (code and code in profile.body_parts):
            continue
        if profile.max_images and not (0 < n_images <= profile.max_images):
            continue
        rank = (0 if profile.body_parts else 1, 0 if profile.max_images else 1, order)
        if best is None or rank < best[0]:
            best = (rank, profile)
    if best is None:
        raise KeyError(f"no prompt profile for modality {modality!r}")
    return best[1]


class _KeepUnknown(dict):
    """format_map helper: unknown placeholders stay as written instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, prepared: "PreparedSeries", profile: PromptProfile) -> str:
    """Fill the placeholders of one profile text for this series."""
    from .preprocess import readable_body_part  # local: keeps prompts importable without torch

    body_part = readable_body_part(prepared.body_part) or profile.default_body_part
    n = len(prepared.images)
    values = _KeepUnknown(
        body_part=body_part or "",
        of_body_part=f" of the {body_part}" if body_part else "",
        modality=prepared.modality,
        n_images=str(n),
        the_images="this image" if n == 1 else f"these {n} images",
    )
    return template.format_map(values)


#: How findings are localised: "box" (box_2d on the image, chest X-ray: the only localisation
#: MedGemma 1.5 documents, cxr_anatomy_localization notebook) or "slice" (the SLICE k of a CT/MR).
LOCALISATIONS: tuple[str, ...] = ("box", "slice")


def localisation_for(modality: str) -> str:
    """"slice" for CT and MR (a finding names its slice), "box" for everything else (CR/DX)."""
    return "slice" if modality.upper() in ("CT", "MR") else "box"


_FINDING_KEYS = {
    "box": ('"size_mm" (a number or null), "box_2d" ([y0, x0, y1, x1] on a 0-1000 grid of the image, or null) '
            'and "image_index" ({image_index})'),
    "slice": '"size_mm" (a number or null) and "slice" ({slice})',
}
_ANSWER_FORMAT = (
    "Answer with one JSON object only, with these keys: "
    '"findings" (a list; each item has "finding_type" (one of: {finding_types}), "location", "description", '
    '{change}{finding_keys}),{comparison} "impression", "recommendation", '
    '"image_quality" ("adequate", or "limited" when the image is not interpretable: over-exposed, motion, '
    'cropped) and "triage" ("normal", "abnormal" or "urgent").'
)
#: With a prior study (:mod:`.longitudinal`): what the two extra keys of the answer mean. A box or
#: slice always refers to the CURRENT images; a resolved finding is on the prior only (none then).
_CHANGE_KEY = ('"change" (compared with the PRIOR study: {changes}; "resolved" for a finding seen on the '
               'prior and gone now, with no box or slice), ')
_COMPARISON_KEY = ' "comparison" (one sentence comparing the CURRENT study with the PRIOR study),'
_LANGUAGE_LINE = {
    ("en", True): "",
    ("zh", True): " Write the text values in Simplified Chinese; keep the keys and the listed values in English.",
    ("en", False): "",
    ("zh", False): " Write the report in Simplified Chinese.",
}
#: The second turn of "report" mode: the model's own report becomes structured data.
EXTRACTION_QUESTION = (
    "Now give the findings of your report above as structured data. Use only what your report says; "
    "add nothing."
)


def answer_format(n_images: int, structured: bool, language: str = "en", localisation: str = "box",
                  compared: bool = False) -> str:
    """What follows the question: the JSON answer format (structured mode) and the language.

    ``n_images`` counts the current series' images; ``compared``: a prior study is in the input, each
    finding gets its "change" and the answer a "comparison" sentence (the schema's ``compared``)."""
    from .result import CHANGE_VALUES, FINDING_TYPES  # light module

    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
    if localisation not in LOCALISATIONS:
        raise ValueError(f"localisation must be one of {LOCALISATIONS}, not {localisation!r}")
    text = ""
    if structured:
        index = (f"the 1-based number of the image the box is on, 1 to {n_images}, or null" if n_images > 1
                 else "null")
        slice_ = (f"the number k of the SLICE k where the finding is best seen, 1 to {n_images}, or null"
                  if n_images > 1 else "1 when the finding is on the image, else null")
        keys = _FINDING_KEYS[localisation].format(image_index=index, slice=slice_)
        change = _CHANGE_KEY.format(changes=", ".join(CHANGE_VALUES)) if compared else ""
        text = " " + _ANSWER_FORMAT.format(finding_types=", ".join(FINDING_TYPES), finding_keys=keys,
                                           change=change, comparison=_COMPARISON_KEY if compared else "")
    return text + _LANGUAGE_LINE[(language, structured)]


def system_text(prepared: "PreparedSeries", profile: PromptProfile, thinking: bool = False) -> str:
    """The system instruction of a series' conversation ("" for none); Google's thinking line first."""
    text = render(profile.system, prepared, profile).strip()
    if thinking:
        text = f"{THINKING_INSTRUCTION} {text}".strip()
    return text


def build_messages(
    prepared: "PreparedSeries", profile: PromptProfile, *, structured: bool = False, language: str = "en",
    thinking: bool = False, localisation: str | None = None,
) -> list[dict[str, Any]]:
    """Gemma 3 chat messages: [system,] one user turn with instruction, images (+ labels), question last.

    ``structured`` appends the JSON answer format to the question (one-pass "structured" and "free"
    modes); ``language`` ("zh") asks for Chinese text; ``thinking`` adds Google's thinking system
    instruction. ``localisation`` ("box" / "slice") defaults to the modality's. The blank line before
    the question is written inside the text item that ends with the last label (see the module doc).
    """
    n = len(prepared.images)
    messages: list[dict[str, Any]] = []
    system = system_text(prepared, profile, thinking)
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content: list[dict[str, Any]] = []
    instruction = render(profile.instruction, prepared, profile).strip()
    if instruction:
        content.append({"type": "text", "text": instruction})
    question = render(profile.question, prepared, profile).strip() + answer_format(
        n, structured, language, localisation or localisation_for(prepared.modality))
    label = profile.label_images and n > 1
    for k, (image, text) in enumerate(zip(prepared.images, prepared.labels), 1):
        content.append({"type": "image", "image": image})
        if label:
            # high_dimensional_ct notebook: "SLICE k" after each image, then "\n\n" + query.
            content.append({"type": "text", "text": f"{text}\n\n{question}" if k == n else text})
    if not label:
        content.append({"type": "text", "text": question})
    messages.append({"role": "user", "content": content})
    return messages


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Number of images in a conversation (what the extraction's slice / image numbers range over)."""
    return sum(1 for m in messages for item in (m.get("content") if isinstance(m.get("content"), list) else [])
               if isinstance(item, Mapping) and item.get("type") == "image")


def extraction_messages(
    report_messages: Sequence[Mapping[str, Any]], report_text: str, language: str = "en", *,
    localisation: str = "box", n_images: int | None = None, compared: bool = False,
) -> list[dict[str, Any]]:
    """The second turn of "report" mode: the same conversation, the model's report as the assistant
    turn, then a user turn asking for the findings JSON (decoded under the findings grammar).

    ``report_text`` is the report without its thinking trace (Google's notebooks drop the trace
    before using an answer). ``n_images`` defaults to the images in ``report_messages`` (with a prior
    in the conversation, pass the current series' count). ``compared``: the report compared a prior.
    """
    n = count_images(report_messages) if n_images is None else int(n_images)
    question = EXTRACTION_QUESTION + answer_format(max(n, 1), True, language, localisation, compared)
    return [
        *[dict(m) for m in report_messages],
        {"role": "assistant", "content": [{"type": "text", "text": report_text.strip()}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
