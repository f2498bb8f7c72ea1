"""Outputs that appear whole or not at all: written under a hidden name beside the target, then renamed."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` when the block succeeds and is removed
    when it fails. The suffix is kept: writers such as savefig and to_parquet read the format from it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def directory_lock(path: Path, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """An advisory lock (flock) on a directory, held for the block; yields whether it was taken (always, when
    waiting). The kernel drops it with the process, so a killed holder never leaves it behind."""
    handle = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            taken = False
        else:
            taken = True
        yield taken
    finally:
        os.close(handle)


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a finished directory into place. The one it replaces is removed only after the swap; one left by a
    process killed between the two renames (a hidden `.<name>.old-*`) is removed by the next swap."""
    retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    for old in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
