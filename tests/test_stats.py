"""Dataset statistics and the duration histogram."""

from __future__ import annotations

import argparse
import json

import av
import pytest

from smart_turn_mm import metafile
from smart_turn_mm import stats as S


def _rows() -> list[dict]:
    rows = []
    for source, labels in (("a", [None, False, True]), ("b", [None, True])):
        for i, label in enumerate(labels):
            rows.append(
                {
                    "file_name": f"audio/{source}_{i}.wav",
                    "id": f"{source}_{i}",
                    "endpoint_bool": label,
                    "dataset": "talks",
                    "source": source,
                    "duration_s": 1.0 + i,
                    "trailing_ms": 200,
                    "pause_ms": 800,
                    "face_found": source == "a",
                    "video_path": f"video/{source}_{i}.mp4" if source == "a" else None,
                    "label_source": None if label is None else "autolabel",
                }
            )
    rows.append({"file_name": "audio/hub.wav", "id": "hub", "endpoint_bool": False})
    return rows


def test_counts_durations_and_face_rate():
    stats = S.dataset_stats(_rows())
    assert stats["segments"] == 6 and stats["recordings"] == 3
    assert stats["face_found_rate"] == pytest.approx(3 / 5)
    assert stats["with_video"] == 3
    by_label = stats["by_label"]
    assert {k: v["count"] for k, v in by_label.items()} == {
        "complete": 2,
        "incomplete": 2,
        "unlabelled": 2,
    }
    assert by_label["complete"]["duration_s"]["median"] == pytest.approx(2.5)
    assert by_label["complete"]["trailing_ms"]["min"] == 200
    assert by_label["complete"]["face_found_rate"] == pytest.approx(0.5)
    assert stats["by_source"]["a"] == {"unlabelled": 1, "incomplete": 1, "complete": 1}
    assert stats["by_dataset"] == {"talks": 5, "?": 1}
    assert stats["by_label_source"] == {"autolabel": 3, "none": 3}
    assert stats["total_hours"] == pytest.approx(9.0 / 3600, abs=1e-4)
    assert S.dataset_stats([])["segments"] == 0


def test_histogram_png(tmp_path):
    path = S.plot_histogram(_rows(), tmp_path / "h.png", title="talks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    assert frame.width >= 400 and frame.height >= 200


def test_stats_command_line(tmp_path, capsys):
    metafile.rewrite_jsonl(tmp_path / "metadata.jsonl", _rows())
    parser = argparse.ArgumentParser()
    S.add_arguments(parser)
    assert S.run(parser.parse_args([str(tmp_path), "--json"])) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["segments"] == 6 and (tmp_path / "stats.png").is_file()
    assert S.run(parser.parse_args([str(tmp_path), "--no-png"])) == 0
    out = capsys.readouterr().out
    assert "6 segments from 3 recordings" in out and "face found in 60.0%" in out
    with pytest.raises(FileNotFoundError, match="prepare"):
        S.run(parser.parse_args([str(tmp_path / "missing")]))
