"""Outputs that appear whole or not at all: written under a hidden name beside the target, then renamed."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` when the block succeeds and is removed
    when it fails. The suffix is kept: writers such as savefig and to_parquet read the format from it. The name is
    the writer's own: two writers of one path (a Spark task and its speculative copy) never share a file, so one that
    dies part-way cannot truncate what the other finished. A writer killed mid-way leaves it (interrupted_writes).
    The file is flushed before the rename and the folder after it: after a power loss the rename could otherwise name
    an empty file (a results.json that marks a finished run)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def fsync_tree(folder: Path) -> None:
    """Flush the files under `folder`, and the folders that name them, to stable storage. A rename is durable only once
    what it names is: after a power loss, a checkpoint renamed into place could otherwise hold empty files."""
    for path in [*sorted(Path(folder).rglob("*"), reverse=True), Path(folder)]:
        with suppress(FileNotFoundError):  # a temporary file another rank renamed meanwhile
            fsync(path)


def fsync(path: Path) -> None:
    """Flush one file, or one folder's entries, to stable storage."""
    directory = path.is_dir()
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError:
        if not directory:  # some filesystems cannot flush a directory; a file that cannot be flushed is an error
            raise
    finally:
        os.close(handle)


def interrupted_writes(folder: Path) -> list[Path]:
    """The temporary files that atomic_path writers killed mid-way left in `folder`."""
    return sorted(Path(folder).glob(".*.tmp*"))


_UNLOCKABLE_DEVICES: set[int] = set()

# The lock handles this process holds. A forked child (a DataLoader worker) inherits copies, and a flock lock lasts
# until every copy is closed: a worker outliving its killed rank would keep the run's lock, and torchrun's restart
# would find the run_dir in use. The child closes its copies; it never unlocks (that would drop the parent's lock).
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for handle in _HELD:
        try:
            os.close(handle)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _flock(handle: int, path: Path, mode: int) -> bool:
    """flock; False when another holder blocks a non-waiting request. A filesystem that refuses to lock a directory
    (Lustre mounted noflock: ENOSYS) is warned about and treated as taken: the guard is lost there, not the job.
    (NFS takes directory locks without an error, but each node sees only its own.)"""
    try:
        fcntl.flock(handle, mode)
    except BlockingIOError:
        return False
    except OSError as err:
        device = os.fstat(handle).st_dev
        if device not in _UNLOCKABLE_DEVICES:  # once per filesystem: every checkpoint would repeat it
            _UNLOCKABLE_DEVICES.add(device)
            warnings.warn(f"{path}: this filesystem cannot lock it ({err}); going on without locks", RuntimeWarning, stacklevel=2)
    return True


@contextmanager
def exclusive_lock(path: Path, wait_seconds: float = 0.0) -> Iterator[bool]:
    """An exclusive advisory lock (flock) on a directory, held for the block; yields whether it was taken within
    `wait_seconds` (polled, so another holder, e.g. a stuck reader, delays the caller only so long). The kernel
    drops it with the process, so a killed holder never leaves it behind."""
    handle = os.open(path, os.O_RDONLY)
    _HELD.add(handle)
    try:
        deadline = time.monotonic() + wait_seconds
        taken = _flock(handle, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        while not taken and time.monotonic() < deadline:
            time.sleep(0.1)
            taken = _flock(handle, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield taken
    finally:
        _HELD.discard(handle)
        os.close(handle)


@contextmanager
def reading_lock(path: Path, attempts: int = 100) -> Iterator[None]:
    """A shared lock on the directory at `path` while the block reads it: replace_dir waits for it before moving
    the directory away (and checkpoint pruning skips it). A swap between the open and the lock leaves the lock on
    the retired directory; then the new one is locked instead, so the block always reads what is at `path`."""
    for attempt in range(attempts):
        try:
            handle = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # between a swap's two renames, or removed
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
            continue
        _HELD.add(handle)
        try:
            _flock(handle, path, fcntl.LOCK_SH)
            locked = os.fstat(handle)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                yield
                return
        finally:
            _HELD.discard(handle)
            os.close(handle)
    raise FileNotFoundError(f"{path}: replaced or removed while waiting to read it, {attempts} times")


class DirectoryInUse(RuntimeError):
    """A directory that replace_dir was told not to take from its readers is being read."""


def replace_dir(staging: Path, final: Path, reader_wait: float = 300.0, refuse_in_use: bool = False) -> None:
    """Swap a finished directory into place, once its readers (reading_lock) are done or after `reader_wait`
    seconds (refuse_in_use: raise DirectoryInUse instead, leaving both directories as they are). The one it replaces
    is removed only after the swap; one left by a process killed between the two renames (a hidden `.<name>.old-*`)
    is put back by a resume (checkpoint.recover_interrupted_writes), or else removed by the next swap."""
    retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        # A stuck reader (a paused launch/evaluate.py) must not stall a training job past its collectives' timeout.
        with exclusive_lock(final, wait_seconds=reader_wait) as taken:
            if not taken:
                if refuse_in_use:
                    raise DirectoryInUse(f"{final}: being read (a reading lock held for {reader_wait:g} s)")
                warnings.warn(f"{final}: a reader has held it for {reader_wait:g} s; replacing it anyway", RuntimeWarning, stacklevel=2)
            os.replace(final, retired)
            os.replace(staging, final)
    else:
        os.replace(staging, final)
    fsync(final.parent)  # the rename itself
    for old in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
