"""Returning results: C-STORE SCU to the configured destinations (STOW-RS later)."""

from .c_store import ExportError, send_c_store

__all__ = ["ExportError", "send_c_store"]
