"""``python -m scp_node`` runs the CLI (same as ``scp-node``)."""

from .cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it in a receiver
    main()
