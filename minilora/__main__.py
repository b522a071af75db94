"""``python -m minilora``: the minilora command (minilora.cli)."""

import sys

from minilora.cli import main

if __name__ == "__main__":
    sys.exit(main())
