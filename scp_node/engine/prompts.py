"""Prompt profiles (instruction + question per modality) and the chat messages built from them.

Why data: radiologists will want to tune wording per site without touching code, so profiles are plain
dicts that can later be loaded from the node's configuration. The message *layout* follows MedGemma
1.5's recipes and is code: instruction first, then every image (CT/MR: each followed by its
"SLICE k" label; a single image gets no label), then the question **last**.

Placeholders usable in ``instruction`` and ``question``: ``{body_part}`` ("chest"),
``{of_body_part}`` (" of the chest" or ""), ``{modality}`` ("CT") and ``{n_images}`` ("85").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

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

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> "PromptProfile":
        """Build from a config-style dict; raises ValueError naming the missing or bad key."""
        for key in ("instruction", "question"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ValueError(f"prompt profile {name!r}: {key!r} must be a non-empty string")
        return cls(
            name=name,
            modalities=tuple(str(m).upper() for m in data.get("modalities", ())),
            instruction=data["instruction"],
            question=data["question"],
            label_images=bool(data.get("label_images", False)),
            default_body_part=str(data.get("default_body_part", "")),
        )


def profile_for_modality(
    modality: str, profiles: Mapping[str, Mapping[str, Any]] | None = None
) -> PromptProfile:
    """The first profile that lists ``modality``; KeyError when none does."""
    profiles = DEFAULT_PROMPT_PROFILES if profiles is None else profiles
    for name, data in profiles.items():
        if modality.upper() in [str(m).upper() for m in data.get("modalities", ())]:
            return PromptProfile.from_mapping(name, data)
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


def build_messages(prepared: "PreparedSeries", profile: PromptProfile) -> list[dict[str, Any]]:
    """Gemma 3 chat messages: one user turn with instruction, images (+ labels), question last."""
    content: list[dict[str, Any]] = [{"type": "text", "text": render(profile.instruction, prepared, profile)}]
    label = profile.label_images and len(prepared.images) > 1
    for image, text in zip(prepared.images, prepared.labels):
        content.append({"type": "image", "image": image})
        if label:
            content.append({"type": "text", "text": text})
    content.append({"type": "text", "text": render(profile.question, prepared, profile)})
    return [{"role": "user", "content": content}]
