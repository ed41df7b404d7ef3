"""Atomic writes (smart_turn_mm.locations.atomic_path)."""

from __future__ import annotations

import stat

import pytest

from smart_turn_mm.locations import atomic_path, file_mode


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == file_mode()  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target, suffix=".mp4") as tmp:
        assert tmp.suffix == ".mp4"
        tmp.write_text("partial")
        raise RuntimeError("disk full")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left
