"""Run the local broker: `python -m localbus --help`."""

from __future__ import annotations

import sys

from localbus.cli import main

if __name__ == "__main__":
    sys.exit(main())
