"""What every DICOMweb route needs from the node, handed over once at app creation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..audit import AuditTrail
from ..config import WebConfig
from ..store.ingest import Ingestor
from .catalog import Catalog


@dataclass
class WebContext:
    """The node's shared pieces (one database, one ingestor, one audit trail) plus web settings."""

    ingestor: Ingestor
    audit: AuditTrail
    catalog: Catalog
    web: WebConfig
    #: Where STOW-RS part bodies are spooled while a request streams in.
    spool_dir: Path
