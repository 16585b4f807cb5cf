"""``python -m scp_node`` runs the CLI (same as ``scp-node``)."""

from .cli import main

main()
