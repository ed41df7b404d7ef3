"""Automatic labels: the last segment complete, middle ones incomplete, first unlabelled."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from talking_heads import GOOD, NO_FACE, have_espeak, prepared_dataset

from smart_turn_mm import autolabel as A
from smart_turn_mm import metafile


def _recording(source: str, n: int, *, recording_s: float = 20.0, transcript=None, last=True):
    """Rows as prepare writes them for one recording of ``n`` segments."""
    return [
        {
            "file_name": f"audio/{source}_{i:03d}.wav",
            "id": f"{source}_{i:03d}",
            "endpoint_bool": None,
            "video_path": None,
            "source": source,
            "segment_index": i,
            "num_segments": n,
            "is_last": last and i == n - 1,
            "trailing_ms": 200,
            "duration_s": 2.0 + i,
            "after_cut_s": 1.0,
            "recording_s": recording_s,
            "transcript": transcript,
            "label_source": None,
        }
        for i in range(n)
    ]


def _write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    metafile.rewrite_jsonl(folder / "metadata.jsonl", rows)
    return folder


def _labels(folder: Path) -> dict[str, bool | None]:
    return {r["id"]: r["endpoint_bool"] for r in metafile.read_jsonl(folder / "metadata.jsonl")}


def test_rule_labels_last_complete_middle_incomplete_first_unlabelled(tmp_path):
    folder = _write(
        tmp_path, _recording("a", 4) + _recording("b", 1) + _recording("c", 3, last=False)
    )
    summary = A.autolabel(folder)
    labels = _labels(folder)
    assert [labels[f"a_{i:03d}"] for i in range(4)] == [None, False, False, True]
    assert labels["b_000"] is True  # a single segment is the last one
    # the recording's last speech was not cut (it ran into the end): all are mid-pauses
    assert [labels[f"c_{i:03d}"] for i in range(3)] == [None, False, False]
    assert summary.labels == {"complete": 2, "incomplete": 4, "unlabelled": 2}
    assert summary.changed == 6 and not summary.warnings
    log = metafile.read_jsonl(folder / A.LOG_NAME)
    assert len(log) == 6 and {e["reason"] for e in log} >= {"last segment of the recording"}
    # idempotent: a second run changes nothing and logs nothing
    assert A.autolabel(folder).changed == 0
    assert len(metafile.read_jsonl(folder / A.LOG_NAME)) == 6


def test_first_segment_option_and_dry_run(tmp_path):
    folder = _write(tmp_path, _recording("a", 3))
    before = (folder / "metadata.jsonl").read_bytes()
    summary = A.autolabel(folder, A.AutolabelRules(first=False), dry_run=True)
    assert summary.changed == 3
    assert (folder / "metadata.jsonl").read_bytes() == before
    assert not (folder / A.LOG_NAME).exists()
    A.autolabel(folder, A.AutolabelRules(first=False))
    assert list(_labels(folder).values()) == [False, False, True]


def test_recordings_are_excluded_by_transcript_words_and_length(tmp_path):
    rows = (
        _recording("swear", 3, transcript="Well, uh, darn it all.")
        + _recording("ok", 3, transcript="Darned good weather today.")
        + _recording("short", 3, recording_s=3.0)
        + _recording("few", 2)
    )
    folder = _write(tmp_path, rows)
    rules = A.AutolabelRules(exclude_words=("darn",), min_recording_s=5.0, min_segments=3)
    summary = A.autolabel(folder, rules)
    assert set(summary.excluded_recordings) == {"swear", "short", "few"}
    assert "transcript contains 'darn'" in summary.excluded_recordings["swear"]
    labels = _labels(folder)
    assert all(labels[f"{s}_{i:03d}"] is None for s in ("swear", "short") for i in range(3))
    assert [labels[f"ok_{i:03d}"] for i in range(3)] == [None, False, True]  # "darned" != "darn"


def test_manual_labels_are_kept_unless_overwritten(tmp_path):
    rows = _recording("a", 3)
    rows[2]["endpoint_bool"], rows[2]["label_source"] = False, "manual"
    folder = _write(tmp_path, rows)
    summary = A.autolabel(folder)
    assert summary.kept_manual == 1 and _labels(folder)["a_002"] is False
    A.autolabel(folder, A.AutolabelRules(overwrite_manual=True))
    row = metafile.read_jsonl(folder / "metadata.jsonl")[2]
    assert row["endpoint_bool"] is True and row["label_source"] == "autolabel"


def test_foreign_rows_are_left_alone_and_confounds_are_reported(tmp_path):
    rows = _recording("a", 3)
    rows[1]["trailing_ms"] = 500  # prepared with another --trailing-ms
    rows.append({"file_name": "audio/x.wav", "id": "x", "endpoint_bool": True})
    folder = _write(tmp_path, rows)
    summary = A.autolabel(folder)
    assert summary.not_prepared == 1 and _labels(folder)["x"] is True
    assert any("different trailing silences" in w for w in summary.warnings)
    with pytest.raises(FileNotFoundError, match="prepare"):
        A.autolabel(tmp_path / "missing")


def test_autolabel_command_line(tmp_path, capsys):
    folder = _write(tmp_path, _recording("a", 3, transcript="hello there"))
    parser = argparse.ArgumentParser()
    A.add_arguments(parser)
    assert A.run(parser.parse_args([str(folder), "--exclude-words", "nothing, else"])) == 0
    out = capsys.readouterr().out
    assert "1 complete, 1 incomplete, 1 unlabelled" in out and "changed 2 label(s)" in out
    assert A.run(parser.parse_args([str(folder), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == 0


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_prepare_autolabel_then_training_loader(tmp_path_factory, tmp_path):
    """End to end: generated talking heads -> prepare -> autolabel -> the training loader."""
    from smart_turn_mm.dataset import iter_batches, label_counts, load_folder

    _, prepared = prepared_dataset(tmp_path_factory.getbasetemp())
    folder = tmp_path / "dataset"
    shutil.copytree(prepared, folder)
    summary = A.autolabel(folder)
    assert summary.labels == {"complete": 3, "incomplete": 1, "unlabelled": 3}
    segments = load_folder(folder)
    counts = label_counts(segments)
    assert counts["complete"] == 3 and counts["incomplete"] == 1
    by_id = {s.id: s for s in segments}
    rows = metafile.read_jsonl(folder / "metadata.jsonl")
    for row in rows:
        segment = by_id[row["id"]]
        assert segment.group == row["source"]  # splits group by recording
        assert segment.has_video == row["face_found"]
    labelled = [s for s in segments if s.label is not None]
    assert {s.group for s in labelled if not s.has_video} == {
        r["source"] for r in rows if r["source_path"] == NO_FACE
    }
    batch = next(iter_batches(labelled, batch_size=len(labelled), num_frames=32, frame_size=112))
    assert batch.features.shape == (len(labelled), 80, 800)
    assert batch.pixels is not None and batch.pixels.shape[1:] == (3, 32, 112, 112)
    assert batch.video_mask.sum() == sum(s.has_video for s in labelled)
    assert np.isfinite(batch.pixels).all() and np.isfinite(batch.features).all()
    good = [r for r in rows if r["source_path"] == GOOD]
    assert [r["endpoint_bool"] for r in good] == [None, False, True]

    # ... and training runs on it as it is (both stages, a few steps), without manual edits.
    from smart_turn_mm.train import TrainConfig, train

    config = TrainConfig(
        data_dir=str(folder),
        model="tiny",
        audio_init="random",
        video_init="random",
        output_dir=str(tmp_path / "runs"),
        eval_fraction=0.0,
        batch_size=4,
        stage1_max_steps=2,
        stage2_max_steps=1,
        num_workers=0,
        bootstrap=0,
        progress=False,
    )
    result = train(config)
    assert result.global_step == 3
    assert (result.model_dir / "model.safetensors").is_file()
