"""What every process of the node opens the same way: its run-time files and its index.

Below the CLI and the node (``scp-node status`` reads the pid file the node writes; the receiver
processes open the index as the node does), so none of them imports another for these.
"""

from __future__ import annotations

import sys
from typing import Any

from .audit import AuditTrail, load_or_create_secret
from .config import Config
from .store.db import Database

#: In ``Config.var_dir``: the node's pid file, doubling as its heartbeat (JSON).
PID_FILE = "scp-node.pid"
#: In ``Config.var_dir``: held (flock) while a node runs on this storage.
LOCK_FILE = "scp-node.lock"


def open_database(config: Config) -> tuple[Database, AuditTrail]:
    """The index and the audit trail, as every command opens them."""
    db = Database(config.store.database_url)
    secret = load_or_create_secret(config.audit.secret_file)
    return db, AuditTrail(db, secret)


def gpu_memory() -> dict[str, Any]:
    """GPU memory of this process (allocated / reserved by torch), when CUDA is in use."""
    torch = sys.modules.get("torch")  # never import torch just to report on it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_device": torch.cuda.get_device_name(0),
            "gpu_memory_allocated_bytes": int(torch.cuda.memory_allocated()),
            "gpu_memory_reserved_bytes": int(torch.cuda.memory_reserved()),
            "gpu_memory_total_bytes": int(torch.cuda.get_device_properties(0).total_memory)}
