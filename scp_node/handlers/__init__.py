"""pynetdicom event handlers, bound to events in :mod:`scp_node.node` (pynetdicom style)."""

from .association import AccessList, handle_aborted, handle_accepted, handle_conn_open, handle_requested
from .echo import handle_echo
from .store import handle_store

__all__ = ["AccessList", "handle_aborted", "handle_accepted", "handle_conn_open", "handle_echo", "handle_requested",
           "handle_store"]
