"""The local HMAC key that turns patient identifiers into audit-safe hashes.

Generated on first start (32 random bytes, file mode 0600) and never leaves the machine.  The
same key gives the same hash for the same PatientID, so an admin can follow one patient through
the audit trail without the trail holding the identifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    """Read the key at ``path``; create it with 0600 permissions if it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        # Write the key to a private temporary file and publish it with link(): the final name
        # appears only with its full content.  (Creating the final name with O_EXCL and then
        # writing let a concurrent starter read an empty file and fail with "too short".)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process won the race: use its key
                return load_or_create_secret(path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key
    if len(data) < 16:
        raise ValueError(f"audit secret {path} is too short ({len(data)} bytes); remove it to regenerate")
    return data


def keyed_hash(secret: bytes, value: str | None) -> str:
    """HMAC-SHA256 of ``value`` (hex, 32 chars); empty for an empty identifier."""
    if not value:
        return ""
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
