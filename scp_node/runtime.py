"""What every process of the node opens the same way: its run-time files and its index.

Below the CLI and the node (``scp-node status`` reads the pid file the node writes; the receiver
processes open the index as the node does), so none of them imports another for these.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any

from .audit import AuditTrail, load_or_create_secret
from .config import Config
from .store.db import Database
from .store.schema import SchemaError, ensure_current

#: In ``Config.var_dir``: the node's pid file, doubling as its heartbeat (JSON).
PID_FILE = "scp-node.pid"
#: In ``Config.var_dir``: held (flock) while a node runs on this storage.
LOCK_FILE = "scp-node.lock"


def open_database(config: Config) -> tuple[Database, AuditTrail]:
    """The index and the audit trail, as every command opens them."""
    db = Database(config.store.database_url)
    secret = load_or_create_secret(config.audit.secret_file)
    return db, AuditTrail(db, secret)


def schema_problem(config: Config, db: Database) -> str | None:
    """Why the node cannot work on this index's schema (behind this scp_node's: the message names
    ``scp-node db upgrade``), or None.  ``serve`` stops with it before touching anything."""
    try:
        ensure_current(db, config.source)
    except SchemaError as exc:
        return str(exc)
    return None


def node_running(config: Config) -> bool:
    """Whether a node holds the run-time folder's lock (``serve`` with this config runs now)."""
    try:
        fd = os.open(config.var_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def gpu_memory() -> dict[str, Any]:
    """GPU memory of this process (allocated / reserved by torch), when CUDA is in use."""
    torch = sys.modules.get("torch")  # never import torch just to report on it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_device": torch.cuda.get_device_name(0),
            "gpu_memory_allocated_bytes": int(torch.cuda.memory_allocated()),
            "gpu_memory_reserved_bytes": int(torch.cuda.memory_reserved()),
            "gpu_memory_total_bytes": int(torch.cuda.get_device_properties(0).total_memory)}
