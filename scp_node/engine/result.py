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


#: Coded finding types the model may name (the JSON schema's enum); "other" for anything else.
#: The report maps each to a SNOMED CT concept (scp_node.report.codes).
FINDING_TYPES: tuple[str, ...] = (
    "no_acute_finding", "pleural_effusion", "pneumothorax", "consolidation", "nodule", "mass",
    "cardiomegaly", "atelectasis", "pulmonary_edema", "fracture", "other",
)
TRIAGE_VALUES: tuple[str, ...] = ("normal", "abnormal", "urgent")
#: How a finding changed since the prior study (the JSON schema's enum when a prior is compared).
#: The report maps each to a coded concept (scp_node.report.codes).
CHANGE_VALUES: tuple[str, ...] = ("new", "improved", "stable", "worsened", "resolved")


@dataclass(frozen=True)
class ImageRegion:
    """A box the model drew, mapped back to one source image's own pixel grid.

    ``box_2d`` is the model's [y0, x0, y1, x1] on the 0-1000 grid of the zero-padded square input;
    ``row0..col1`` are the same box in the source image's pixels (0-based, ordered, clipped to
    Rows x Columns).  ``source_index`` says which entry of ``AnalysisResult.sources`` it is on.
    """

    source_index: int
    box_2d: tuple[int, int, int, int]
    row0: float
    col0: float
    row1: float
    col1: float


@dataclass(frozen=True)
class Finding:
    """One finding of the structured answer."""

    finding_type: str  #: one of FINDING_TYPES
    description: str = ""
    location: str = ""
    size_mm: float | None = None
    region: ImageRegion | None = None  #: a box on one image (chest X-ray)
    #: CT/MR: which entry of ``AnalysisResult.sources`` the finding is on (the model's SLICE k - 1)
    source_index: int | None = None
    #: Compared with the prior study: one of CHANGE_VALUES ("" when no prior was compared).
    change: str = ""


@dataclass(frozen=True)
class StructuredFindings:
    """The model's JSON answer, parsed and validated."""

    findings: tuple[Finding, ...] = ()
    impression: str = ""
    recommendation: str = ""
    image_quality: str = "adequate"  #: "adequate" or "limited" (the quality gate)
    triage: str = "normal"  #: one of TRIAGE_VALUES
    #: One sentence on the comparison with the prior ("" when no prior was compared).
    comparison: str = ""


@dataclass(frozen=True)
class TurnStats:
    """One model call of an analysis: "report" and "extraction" (report mode) or "answer"."""

    name: str
    input_tokens: int  #: prompt tokens, image tokens included
    new_tokens: int  #: tokens generated (thinking trace and final stop token included)
    seconds: float  #: wall time of the generate call (shared by the series of one batch)


@dataclass(frozen=True)
class PriorStudy:
    """The earlier study a series is compared with, as the engine gets it (scheduler.priors).

    Google's longitudinal CXR notebook puts the prior image first and the current one second,
    each labelled with its date; ``paths`` are the prior series' instances in the index.
    """

    study_instance_uid: str
    series_instance_uid: str
    study_date: str  #: DICOM DA (YYYYMMDD) of the prior
    paths: tuple[str, ...]  #: files of the prior series (absolute paths)
    source: str = "local"  #: "local" or the [[priors]] source it was retrieved from
    interval_days: int | None = None  #: current study date minus prior study date


@dataclass
class Comparison:
    """What the SR, the sidecar and HL7 say about the prior: compared, none, or not comparable."""

    #: "compared": a prior went to the model with the current series; "none": no prior available;
    #: "not_comparable": one was found but not used (``reason`` says why); "unavailable": a source
    #: could not be searched (down, slow); the analysis went on without a prior.
    status: str
    reason: str = ""
    prior_study_instance_uid: str = ""
    prior_series_instance_uid: str = ""
    prior_study_date: str = ""
    interval_days: int | None = None
    source: str = ""
    #: The prior images that went into the model input (referenced in Pertinent Other Evidence).
    prior_sources: list[SourceImageRef] = field(default_factory=list)


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
    #: The parsed structured answer; None when the model's text could not be parsed (then
    #: ``parse_error`` says why and the free text is the report).
    structured: StructuredFindings | None = None
    parse_error: str = ""
    language: str = "en"  #: report language: "en" or "zh"
    answer_mode: str = "structured"  #: "report", "structured" or "free" (scp_node.engine.medgemma)
    #: Per model call: tokens and seconds (report mode: the report turn, then the extraction turn).
    turns: list[TurnStats] = field(default_factory=list)
    prepare_seconds: float = 0.0  #: preprocessing (decode, window, resize) of the series
    #: Not empty: the series was NOT analysed, for this reason; the SR only says so (no findings).
    not_analysed: str = ""
    #: The comparison with a prior study (None: priors were not looked up for this result).
    comparison: Comparison | None = None
