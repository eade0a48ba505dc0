"""`python -m worker`: the worker, as the `memory-worker` command runs it."""

import sys

from worker.cli import main

sys.exit(main())
