"""``python -m faxd``: the same entry point as the ``faxd`` console script."""

import sys

from faxd.cli import main

sys.exit(main())
