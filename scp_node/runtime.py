"""What every process of the node opens the same way: its run-time files and its index.

Below the CLI and the node (``scp-node status`` reads the pid file the node writes; the receiver
processes open the index as the node does), so none of them imports another for these.
"""

from __future__ import annotations

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
