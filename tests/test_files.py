"""Outputs appear whole or not at all."""

import pytest

from darec_dist.files import atomic_path, replace_dir, write_text_atomic


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
