"""``python -m minilora.cli``: the minilora command, as ``python -m minilora``."""

import sys

from minilora.cli import main

if __name__ == "__main__":
    sys.exit(main())
