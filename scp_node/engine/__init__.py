"""MedGemma engine: DICOM series in, :class:`AnalysisResult` out.

Importing this package stays light (no torch, transformers, pydicom): names from the heavy modules
are resolved on first access, so the scheduler, report writer and CLI can import them cheaply.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .modeldir import ModelDirError, check_model_dir, is_test_model, weights_sha256
from .result import AnalysisResult, ModelIdentity, SourceImageRef, TurnStats

_LAZY = {
    "MedGemmaEngine": ".medgemma",
    "EngineError": ".medgemma",
    "GenerationOutput": ".medgemma",
    "make_test_model": ".testmodel",
    "TEST_MODEL_MARKER": ".testmodel",
    "PreparedSeries": ".preprocess",
    "PadTransform": ".preprocess",
    "SeriesSkipped": ".preprocess",
    "SeriesNotAnalysed": ".preprocess",
    "prepare_series": ".preprocess",
    "DEFAULT_PROMPT_PROFILES": ".prompts",
    "PromptProfile": ".prompts",
    "build_messages": ".prompts",
    "extraction_messages": ".prompts",
    "profile_for_modality": ".prompts",
}

__all__ = [
    "AnalysisResult",
    "ModelIdentity",
    "SourceImageRef",
    "TurnStats",
    "ModelDirError",
    "check_model_dir",
    "is_test_model",
    "weights_sha256",
    *_LAZY,
]

if TYPE_CHECKING:
    from .medgemma import EngineError, GenerationOutput, MedGemmaEngine
    from .preprocess import PadTransform, PreparedSeries, SeriesNotAnalysed, SeriesSkipped, prepare_series
    from .prompts import (DEFAULT_PROMPT_PROFILES, PromptProfile, build_messages, extraction_messages,
                          profile_for_modality)
    from .testmodel import TEST_MODEL_MARKER, make_test_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
