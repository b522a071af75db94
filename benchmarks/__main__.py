"""`python -m benchmarks SUITE [SUITE ...] [--smoke] [--out DIR]`: see benchmarks/run.py."""

import sys

from benchmarks.run import main

sys.exit(main(sys.argv[1:]))
