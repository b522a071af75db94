"""The PNGs of `minilora explain --plot DIR`: matplotlib (an optional extra) with the Agg backend, files written
atomically under fixed names."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from minilora.errors import CLIError
from minilora.io.safe_write import atomic_write_bytes


def new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure and its axes as a flat list (ImportError naming the extra if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CLIError("--plot needs matplotlib: pip install 'minilora[demo]' (or pip install matplotlib)") from e
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig: Any, directory: str | os.PathLike, name: str) -> str:
    """Write `fig` as DIRECTORY/NAME (100 dpi) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)
