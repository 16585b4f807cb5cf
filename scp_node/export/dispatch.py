"""One result file to one destination, by the destination's kind: what the export queue calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ops import stats
from .c_store import send_c_store


def send_result(dest: Any, path: Path, *, calling_ae_title: str, timeout: float, index: Any = None) -> object:
    """Send the SR (or, for a webhook, its JSON sidecar; for HL7, the ORU^R01 made from it) at
    ``path`` to ``dest``; raises on failure (the queue retries). Timed for ``[ops]`` metrics."""
    with stats.timed(f"export_{dest.kind}"):
        if dest.kind == "webhook":
            from .webhook import send_webhook

            return send_webhook(dest, path)
        if dest.kind == "hl7":
            from .hl7 import send_hl7

            return send_hl7(dest, path, timeout=dest.ack_timeout_seconds, index=index)
        if dest.kind == "dicomweb":
            from .stow import send_stow

            return send_stow(dest, path, timeout=timeout)
        return send_c_store(dest, path, calling_ae_title=calling_ae_title, timeout=timeout)
