"""Repository maintenance commands (``python -m tools.<name>``); not part of any distribution."""
