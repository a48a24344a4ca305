"""The ``tuneloop`` console script's entry point, kept tiny on purpose.

Python spends about half a second importing the command (argparse, pydantic, the API models)
before :func:`tuneloop.cli.main` can catch a Ctrl-C. The console script imports only this module,
then imports and runs the command inside a ``try``, so a Ctrl-C during that import (or
while the arguments are parsed) ends with exit 130 and
one line, like a Ctrl-C anywhere later, instead of Python's traceback. What is left uncovered is
the interpreter's own start (a few tens of milliseconds) before this module runs.
"""

from __future__ import annotations

import sys

#: The exit code of a run stopped by SIGINT (128 + 2), as :mod:`tuneloop.cli` uses it.
_INTERRUPTED = 130


def main() -> int:
    """Import and run the ``tuneloop`` command; a Ctrl-C at any point of it exits 130."""
    try:
        from tuneloop.cli import main as cli_main  # noqa: PLC0415 (imported here so the try covers it)

        return cli_main()
    except KeyboardInterrupt:  # while importing the command or parsing its arguments
        print("interrupted", file=sys.stderr)
        return _INTERRUPTED
