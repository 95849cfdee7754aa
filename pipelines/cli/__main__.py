"""`python -m pipelines.cli ...`: the `ugcsr` command (the form Ray job entrypoints use)."""

import sys

from .app import run

sys.exit(run())
