"""``python -m bench [--quick] [--runs N] [--cases linear,fanout]``."""

import sys

from bench.cli import main

sys.exit(main())
