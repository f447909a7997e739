"""``python -m cetnet``: the ``cetnet`` command line (see :mod:`cetnet.cli`)."""

import sys

from cetnet.cli import main

sys.exit(main())
