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

Inside one directory, :func:`staged_files` does the same per file: every file of a save (shards, index,
config, adapter weights) is written under a temporary name and all are renamed only once every one is
complete, so a failure while writing any of them leaves all the old files byte-identical. A full disk
(ENOSPC, EDQUOT) surfaces as an ``OSError`` naming the file being written (:func:`readable_disk_errors`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def readable_disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full disk (or quota) met inside the block as an OSError that names ``path``.

    Writers below Python (safetensors, torch.save) report it without the path, or as a RuntimeError of
    their own; the caller names the file it was writing.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        raise _disk_full(e.errno, path) from e
    except Exception as e:  # safetensors' SafetensorError carries the OS error in its text only
        if "os error 28" not in str(e) and "StorageFull" not in str(e):
            raise
        raise _disk_full(errno.ENOSPC, path) from e


def _disk_full(code: int, path: str | os.PathLike) -> OSError:
    message = f"no space left on the device while writing {path}; free some space or write elsewhere"
    return OSError(code, message, str(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: callers write to a temporary name, and
    :func:`staged_files` names the final file when the disk is full)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_files(directory: str | os.PathLike) -> Iterator[Callable[[str], Path]]:
    """Yield ``stage(name) -> temporary path`` in ``directory``; all staged files replace theirs at the end.

        with staged_files(out) as stage:
            save_file(tensors, stage("model.safetensors"))
            write_bytes(stage("config.json"), text)
        # both renamed now; had either write failed, neither old file would have changed

    The renames happen only after the block ends without error and every staged file is fsynced.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}

    def stage(name: str) -> Path:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        staged[directory / name] = Path(tmp)
        return Path(tmp)

    try:
        try:
            yield stage
            for final, tmp in staged.items():
                with readable_disk_errors(final), open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        except OSError as e:  # a full disk met while writing a staged file: name the file it was to become
            if e.errno not in _DISK_FULL or not staged or "while writing" in str(e):
                raise
            raise _disk_full(e.errno, list(staged)[-1]) from e
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    for final, tmp in staged.items():
        os.replace(tmp, final)
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, os.replace)."""
    path = Path(path)
    with staged_files(path.parent) as stage:
        write_bytes(stage(path.name), data)
