"""``python -m faxd.sim``: the same as ``faxd simulate``."""

import sys

from faxd.sim.cli import main

sys.exit(main())
