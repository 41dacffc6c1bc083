"""``python -m reparam``: the command line (see :mod:`reparam.cli`)."""

import sys

from .cli import main

sys.exit(main())
