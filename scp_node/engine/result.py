"""Value objects passed from the engine to the report writer.

Kept free of torch/transformers imports so that the report and scheduler can use them
without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a result: goes into Algorithm Identification and Contributing Equipment."""

    name: str  #: e.g. "MedGemma 1.5 4B" or "scp_node tiny random test model (MedGemma architecture)"
    version: str  #: e.g. "1.5" or "test-<short hash>"
    weights_sha256: str  #: hex digest over the weight files, in sorted file-name order
    is_test_model: bool  #: True for the randomly initialised model made by ``make-test-model``
    device: str = "cpu"  #: "cpu" or "cuda:0" as actually used
    dtype: str = "float32"  #: "bfloat16" on CUDA, "float32" on CPU


@dataclass(frozen=True)
class SourceImageRef:
    """One source instance that went into the model input."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  #: 1-based frame of a multi-frame instance, else None


@dataclass
class AnalysisResult:
    """What the engine says about one series."""

    modality: str  #: "CR", "DX", "CT", "MR", ...
    findings_text: str  #: the model's answer as text (decoded new tokens only, thinking trace removed)
    model: ModelIdentity
    sources: list[SourceImageRef] = field(default_factory=list)  #: instances used as model input
    prompt_profile: str = "default"  #: name of the prompt profile used
    generated_tokens: int = 0
    seconds: float = 0.0
