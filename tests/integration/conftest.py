"""Integration tests use the shared real-peer fixtures of ``tests/conftest.py``."""
