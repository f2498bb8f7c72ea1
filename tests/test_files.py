"""Outputs appear whole or not at all."""

import fcntl
import threading
import time
import warnings

import pytest

from darec_dist.files import DirectoryInUse, atomic_path, exclusive_lock, interrupted_writes, reading_lock, replace_dir, write_text_atomic


@pytest.fixture
def refused_swaps(monkeypatch):
    """An event set when replace_dir's exclusive lock is refused because a reader holds the directory: a swap
    thread that has not yet tried proves nothing, so the tests wait for this."""
    import darec_dist.files as files

    refused, real_flock = threading.Event(), files._flock

    def watched(handle, path, mode):
        taken = real_flock(handle, path, mode)
        if mode & fcntl.LOCK_EX and not taken:
            refused.set()
        return taken

    monkeypatch.setattr(files, "_flock", watched)
    return refused

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.md"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".md" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_a_directory_swap_replaces_the_old_one_and_removes_one_left_by_a_killed_swap(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "v").write_text("old")
    abandoned = tmp_path / ".export.old-deadbeef"  # a process killed between the two renames
    abandoned.mkdir()
    other = tmp_path / ".export2.old-cafecafe"  # another output's: not ours to remove
    other.mkdir()
    staging = tmp_path / ".export.tmp"
    staging.mkdir()
    (staging / "v").write_text("new")
    replace_dir(staging, final)
    assert (final / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export2.old-cafecafe", "export"]


def test_a_directory_being_read_is_swapped_only_after_its_reader_is_done(tmp_path, refused_swaps):
    """A running run's `best` checkpoint, replaced at an improvement while launch/evaluate.py reads it."""
    final = tmp_path / "best"
    final.mkdir()
    (final / "part-1").write_text("old")
    (final / "part-2").write_text("old")
    staging = tmp_path / ".best.tmp"
    staging.mkdir()
    for name in ("part-1", "part-2"):
        (staging / name).write_text("new")
    with reading_lock(final):
        first = (final / "part-1").read_text()
        swap = threading.Thread(target=replace_dir, args=(staging, final))
        swap.start()
        assert refused_swaps.wait(30) and swap.is_alive(), "the swap did not wait for the reader"
        assert (first, (final / "part-2").read_text()) == ("old", "old")
    swap.join(timeout=10)
    assert not swap.is_alive() and (final / "part-1").read_text() == "new"
    with reading_lock(final):  # a reader after the swap locks and reads the new directory
        assert (final / "part-2").read_text() == "new"


def test_a_reader_that_locked_a_directory_swapped_away_locks_the_new_one(tmp_path, monkeypatch, refused_swaps):
    import darec_dist.files as files

    final = tmp_path / "best"
    final.mkdir()
    stagings = [tmp_path / f".best.tmp{i}" for i in (1, 2)]
    for i, staging in enumerate(stagings, 1):
        staging.mkdir()
        (staging / "v").write_text(f"new-{i}")
    real_flock, swapped = files.fcntl.flock, []

    def flock_after_a_swap(handle, mode):  # the trainer swaps between the reader's open and its lock
        if not swapped:
            swapped.append(True)
            replace_dir(stagings[0], final)
        real_flock(handle, mode)

    monkeypatch.setattr(files.fcntl, "flock", flock_after_a_swap)
    with reading_lock(final):
        # Holding the retired directory's lock would not keep the next swap from moving this one away.
        swap = threading.Thread(target=replace_dir, args=(stagings[1], final))
        swap.start()
        assert refused_swaps.wait(30) and swap.is_alive() and (final / "v").read_text() == "new-1"
    swap.join(timeout=10)
    assert (final / "v").read_text() == "new-2"


def test_a_filesystem_that_cannot_lock_directories_warns_and_goes_on(tmp_path, monkeypatch):
    import errno

    import darec_dist.files as files

    def unsupported(handle, mode):  # Lustre mounted noflock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", unsupported)
    monkeypatch.setattr(files, "_UNLOCKABLE_DEVICES", set())
    with pytest.warns(RuntimeWarning, match="cannot lock"):
        with exclusive_lock(tmp_path) as taken:
            assert taken
    staging = tmp_path / ".out.tmp"
    staging.mkdir()
    (tmp_path / "out").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per filesystem, not at every checkpoint
        replace_dir(staging, tmp_path / "out")
        with reading_lock(tmp_path / "out"):
            pass


def test_a_stuck_reader_delays_a_swap_only_so_long(tmp_path):
    """A paused reader must not stall training past its collectives' timeout: after reader_wait, a warning and the swap."""
    final = tmp_path / "best"
    final.mkdir()
    staging = tmp_path / ".best.tmp"
    staging.mkdir()
    (staging / "v").write_text("new")
    with reading_lock(final):
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match="a reader has held it for 0.5 s; replacing it anyway"):
            replace_dir(staging, final, reader_wait=0.5)
        assert time.monotonic() - started >= 0.5 and (final / "v").read_text() == "new"


def test_a_swap_told_to_refuse_a_directory_in_use_leaves_both_as_they_are(tmp_path):
    """A dataset is not taken from a training job that reads it (spark_jobs.prepare fails instead)."""
    final, staging = tmp_path / "data", tmp_path / ".data.tmp"
    for directory, text in ((final, "old"), (staging, "new")):
        directory.mkdir()
        (directory / "v").write_text(text)
    with reading_lock(final):
        with pytest.raises(DirectoryInUse, match=f"{final}: being read"):
            replace_dir(staging, final, reader_wait=0.2, refuse_in_use=True)
    assert (final / "v").read_text() == "old" and (staging / "v").read_text() == "new"
    replace_dir(staging, final, refuse_in_use=True)  # no reader left
    assert (final / "v").read_text() == "new" and not staging.exists()


def _wait_forked(started) -> None:
    started.set()  # after the fork's handlers have run in this child
    time.sleep(60)


def test_a_forked_child_does_not_keep_a_lock_its_parent_released(tmp_path):
    """A DataLoader worker forked while its rank holds the run_dir's lock must not hold it after the rank lets go
    (or is killed): torchrun's restart would find the run_dir in use."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    children = []

    def forked_child():
        started = fork.Event()
        children.append(fork.Process(target=_wait_forked, args=(started,)))
        children[-1].start()
        assert started.wait(30)

    try:
        with exclusive_lock(tmp_path) as taken:
            assert taken
            forked_child()
        with exclusive_lock(tmp_path) as taken_again:
            assert taken_again, "the forked child still holds the lock"
        with reading_lock(tmp_path):  # a shared lock is released alike
            forked_child()
        with exclusive_lock(tmp_path) as taken_after_reader:
            assert taken_after_reader, "the forked child still holds the shared lock"
    finally:
        for child in children:
            child.kill()
            child.join()


def test_two_writers_of_one_path_write_apart(tmp_path):
    """A Spark task and its speculative copy write the same shard: the one that fails must not take the other's file."""
    target = tmp_path / "shard-00000.tar"
    with atomic_path(target) as first:
        first.write_bytes(b"whole")
        with pytest.raises(OSError, match="executor lost"):
            with atomic_path(target) as second:
                assert second != first
                second.write_bytes(b"half")
                raise OSError("executor lost")
        assert first.read_bytes() == b"whole" and interrupted_writes(tmp_path) == [first]
    assert target.read_bytes() == b"whole" and interrupted_writes(tmp_path) == []


def test_fsync_tree_flushes_every_file_and_folder_under_it(tmp_path, monkeypatch):
    import os

    from darec_dist.files import fsync_tree

    (tmp_path / "ckpt" / "tables").mkdir(parents=True)
    for name in ("tables/0.distcp", "state.json", "COMPLETE"):
        (tmp_path / "ckpt" / name).write_text("x")
    flushed, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    fsync_tree(tmp_path / "ckpt")
    everything = {str(p) for p in (tmp_path / "ckpt").rglob("*")} | {str(tmp_path / "ckpt")}
    assert sorted(flushed) == sorted(everything) and flushed[-1] == str(tmp_path / "ckpt")  # the folder after its files
