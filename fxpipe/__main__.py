"""`python -m fxpipe ...`: the same command line as the `fxpipe` script (see fxpipe.cli)."""

from __future__ import annotations

import sys

from fxpipe.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
