"""``python -m diffad ...``: see :mod:`diffad.cli`."""

import sys

from diffad.cli import main

sys.exit(main())
