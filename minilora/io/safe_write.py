"""Writers that cannot lose data: refuse to write over their own inputs, write aside, rename when whole.

Every command that writes a directory (merge, quantize, export, save_adapter, finetune's run directory)
goes through two checks and one context manager:

    check_output(out, inputs)          # out must not be an input, nor inside one, nor contain one
    with output_directory(out) as tmp:  # a lock beside out; everything is written into tmp
        save_things(tmp)                # a failure here leaves the old out byte-identical
    # on success: out's old files move aside, tmp becomes out, the old files are removed

The swap is two renames (old -> aside, tmp -> out), each atomic on one filesystem; between them a crash
leaves the complete old files under ``.<name>.old-*`` and the complete new ones under ``.<name>.tmp-*``,
never a half-written ``out``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from minilora.errors import CLIError


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output path that is one of ``inputs``, lies inside one, or contains one."""
    o = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        i = _resolved(item)
        if o == i or i in o.parents or o in i.parents:
            raise CLIError(
                f"refusing to write {out}: it overlaps the input {item} (writing there could destroy it); "
                "choose an output directory outside every input"
            )


@contextmanager
def lock(out: str | os.PathLike) -> Iterator[Path]:
    """An exclusive lock file ``.<name>.lock`` beside ``out``: a second writer of ``out`` is refused."""
    o = _resolved(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    path = o.parent / f".{o.name}.lock"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise CLIError(
            f"{out} is being written by another process (lock {path}); if no other run is alive, delete the lock"
        ) from None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def output_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block ends without error it becomes ``out``.

    If the block raises (bad input found half-way, disk full, Ctrl-C), the temporary directory is removed
    and ``out``, if it existed, is untouched.
    """
    o = _resolved(out)
    with lock(o):
        tmp = Path(tempfile.mkdtemp(dir=o.parent, prefix=f".{o.name}.tmp-"))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        aside = None
        if o.exists():
            aside = Path(tempfile.mkdtemp(dir=o.parent, prefix=f".{o.name}.old-"))
            os.replace(o, aside / o.name)
        os.replace(tmp, o)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
