"""Batching for :class:`~scp_node.engine.medgemma.MedGemmaEngine`: the per-series job between
preprocessing and generation, and how jobs are grouped into generate calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .preprocess import PreparedSeries
from .prompts import PromptProfile


@dataclass
class _Job:
    """One series of a batch between preprocessing and generation."""

    index: int
    prepared: PreparedSeries
    profile: PromptProfile
    language: str
    messages: list[dict[str, Any]]  #: the first (or only) turn's conversation
    schema: str | None  #: its grammar (None: free text)
    prepare_seconds: float
    limit: int = 256  #: its new-token budget
    localisation: str = "box"  #: "box" (CR/DX) or "slice" (CT/MR)
    extraction_schema: str | None = None  #: "report" mode: the second turn's grammar
    extraction_limit: int = 0  #: and its budget
    first: Optional[Any] = None  #: the first turn's GenerationOutput once generated
    pair: Optional[Any] = None  #: the prior beside the series (:class:`.longitudinal.PriorInput`)
    comparison: Optional[Any] = None  #: what the result says about the prior (Comparison; None: none given)

    @property
    def n_images(self) -> int:
        """Images in the input: the series' and the prior's."""
        return len(self.prepared.images) + (len(self.pair.prepared.images) if self.pair is not None else 0)


def _groups(jobs: list[_Job], max_batch: int) -> list[list[_Job]]:
    """Batches of at most ``max_batch`` jobs of similar size (image count), so that padding a
    one-image X-ray to an 85-slice CT prompt does not waste a batch row's compute."""
    ordered = sorted(jobs, key=lambda j: j.n_images)
    groups: list[list[_Job]] = []
    for job in ordered:
        n = job.n_images
        if groups and len(groups[-1]) < max_batch and n <= 2 * groups[-1][0].n_images:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups
