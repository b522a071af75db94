"""What every command of minilora.cli shares: the line it prints, and where MODEL is on disk."""

from __future__ import annotations

from pathlib import Path


def echo(text: str) -> None:
    print(text, flush=True)


def find_model(ref: str) -> Path:
    """The local directory of MODEL: a directory, a hub id, a .gguf file (converted once) or 'default'."""
    from minilora.io.hub import resolve_model

    return resolve_model(None if ref in ("default", "") else ref)
