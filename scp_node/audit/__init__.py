"""Audit trail: who sent what, what the node did with it, never a clear patient identifier."""

from .secret import keyed_hash, load_or_create_secret
from .trail import AuditTrail, Event

__all__ = ["AuditTrail", "Event", "keyed_hash", "load_or_create_secret"]
