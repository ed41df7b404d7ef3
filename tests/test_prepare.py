"""Dataset preparation: talking-head clips -> segments, face clips and metadata rows."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from talking_heads import (
    GOOD,
    JUNK,
    NO_AUDIO,
    NO_FACE,
    NON_ASCII,
    PHRASES,
    have_espeak,
    prepared_dataset,
    speech_with_pauses,
    write_talking_head,
)

from smart_turn_mm import metafile
from smart_turn_mm import prepare as P
from smart_turn_mm.audio import SAMPLE_RATE
from smart_turn_mm.dataset import METADATA_FIELDS
from smart_turn_mm.video import prepare_video

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    return prepared_dataset(tmp_path_factory.getbasetemp())


def _rows(folder: Path) -> list[dict]:
    return metafile.read_jsonl(folder / "metadata.jsonl")


def _by_path(folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in _rows(folder):
        out.setdefault(row["source_path"], []).append(row)
    return out


def _manifest(folder: Path) -> dict[str, dict]:
    return {e["source_path"]: e for e in metafile.read_jsonl(folder / "prepared.jsonl")}


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


# --------------------------------------------------------------------------- units


def test_plan_segments_cuts_each_pause_with_the_same_trailing_silence():
    options = P.PrepareOptions(silence_ms=500, trailing_ms=200, context_s=8.0)
    sr = SAMPLE_RATE
    speech = [(1 * sr, 2 * sr), (int(2.3 * sr), 3 * sr), (4 * sr, 5 * sr), (9 * sr, 14 * sr)]
    planned = P.plan_segments(speech, 15 * sr, options)
    # the 0.3 s gap is not a pause: regions 0 and 1 merge
    assert [(p.speech_start, p.speech_end) for p in planned] == [
        (1 * sr, 3 * sr),
        (4 * sr, 5 * sr),
        (9 * sr, 14 * sr),
    ]
    assert all(p.cut - p.speech_end == int(0.2 * sr) for p in planned)
    assert [p.is_last for p in planned] == [False, False, True]
    assert [p.pause for p in planned] == [1 * sr, 4 * sr, 1 * sr]
    # the turn starts 200 ms before the first speech; at most 8 s before the cut
    assert planned[0].start == int(0.8 * sr)
    assert planned[2].start == planned[2].cut - 8 * sr
    assert all(p.cut <= 15 * sr for p in planned)


def test_plan_segments_never_cuts_at_the_end_of_the_file():
    options = P.PrepareOptions(silence_ms=500, trailing_ms=200)
    sr = SAMPLE_RATE
    # the last speech runs to 0.1 s before the end: no room for 200 ms of trailing silence
    planned = P.plan_segments([(sr, 2 * sr), (3 * sr, int(4.9 * sr))], 5 * sr, options)
    assert len(planned) == 1
    assert not planned[0].is_last  # speech follows it: a mid-recording pause
    assert P.plan_segments([], 5 * sr, options) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="must not exceed silence_ms"):
        P.PrepareOptions(silence_ms=100, trailing_ms=200)
    with pytest.raises(ValueError, match="even"):
        P.PrepareOptions(clip_size=223)


def test_source_ids_are_ascii_unique_and_stable():
    a = P.source_id("vidéo_会話.mp4")
    b = P.source_id("video_.mp4")
    assert a.isascii() and b.isascii() and a != b
    assert a.startswith("video-") and a == P.source_id("vidéo_会話.mp4")
    assert P.source_id("会話.mp4").startswith("video-")


def test_discover_videos_skips_hidden_files_and_the_output_folder(tmp_path):
    for name in ("a.mp4", "B.MOV", "notes.txt", ".hidden.mp4", "out/x.mp4", "d/c.mkv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = P.discover_videos(tmp_path, exclude=[tmp_path / "out"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["B.MOV", "a.mp4", "d/c.mkv"]
    with pytest.raises(FileNotFoundError):
        P.discover_videos(tmp_path / "missing")


# --------------------------------------------------------------------------- a prepared folder


def test_prepared_rows_follow_spec5_and_cut_at_each_pause(prepared):
    _, out = prepared
    rows = _rows(out)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert all(name in row for name in METADATA_FIELDS)
        assert row["endpoint_bool"] is None and row["synthetic"] is False
        assert row["id"].isascii() and row["file_name"] == f"audio/{row['id']}.wav"
        assert (out / row["file_name"]).is_file()
        assert (out / row["clip_path"]).is_file()
        assert row["end_s"] - row["speech_end_s"] == pytest.approx(0.2, abs=1e-3)
        assert row["end_s"] < row["recording_s"]  # never cut at the end of the file
        assert row["duration_s"] <= 8.0 + 1e-6
    good = _by_path(out)[GOOD]
    assert [r["segment_index"] for r in good] == [0, 1, 2]
    assert [r["is_last"] for r in good] == [False, False, True]
    assert {r["source"] for r in good} == {P.source_id(GOOD)}
    # the cuts follow the phrases: speech ends within 0.25 s after each phrase's true end
    _, spans = speech_with_pauses(PHRASES)
    for row, (_, end) in zip(good, spans, strict=True):
        assert 0.0 <= row["speech_end_s"] - end < 0.25
    assert all(r["face_found"] and r["video_path"] == r["clip_path"] for r in good)


def test_segment_audio_ends_with_trailing_silence_for_both_classes(prepared):
    _, out = prepared
    good = _by_path(out)[GOOD]
    for row in good:  # middle (negative) and last (positive) segments alike
        audio = _read_wav(out / row["file_name"])
        assert len(audio) == round(row["duration_s"] * SAMPLE_RATE)
        tail = audio[-int(0.2 * SAMPLE_RATE) :]
        speech = audio[: -int(0.2 * SAMPLE_RATE)]
        assert np.sqrt(np.mean(tail**2)) < 0.02 * np.sqrt(np.mean(speech**2)) + 2e-3


def test_face_clips_match_the_live_crop(prepared):
    clips, out = prepared
    row = _by_path(out)[GOOD][1]
    with av.open(str(out / row["clip_path"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (P.CLIP_SIZE, P.CLIP_SIZE)
        assert float(stream.average_rate) == pytest.approx(25.0)
        assert not container.streams.audio
        n_frames = sum(1 for _ in container.decode(stream))
    assert abs(n_frames - row["duration_s"] * 25) <= 1.5
    # what a live detector sees at the cut: the last 32 source frames before it
    with av.open(str(clips / GOOD)) as container:
        frames = [
            f.to_ndarray(format="rgb24")
            for f in container.decode(video=0)
            if f.time < row["end_s"] - 1e-6
        ][-32:]
    live = prepare_video(frames, face_crop=True)
    assert live.face_found
    assert [live.box.x0, live.box.y0, live.box.x1, live.box.y1] == row["face_box"]
    trained = prepare_video(out / row["video_path"], face_crop=False)
    assert trained.pixel_values.shape == (3, 32, 112, 112)
    # same face, same framing: only two H.264 passes and the 224 -> 112 halving differ
    diff = np.abs(trained.pixel_values - live.pixel_values).mean()
    assert diff < 0.06, diff
    # and the same frames: one frame off (the background changes every frame) is worse
    shifted = np.abs(trained.pixel_values[:, 1:] - live.pixel_values[:, :-1]).mean()
    assert diff < 0.8 * shifted, (diff, shifted)


def test_bad_inputs_are_logged_and_skipped(prepared):
    _, out = prepared
    manifest = _manifest(out)
    assert manifest[JUNK]["status"] == "skipped"
    assert "not a readable media file" in manifest[JUNK]["reason"]
    assert manifest[NO_AUDIO] == {**manifest[NO_AUDIO], "status": "skipped"}
    assert manifest[NO_AUDIO]["reason"] == "no audio stream"
    by_path = _by_path(out)
    assert JUNK not in by_path and NO_AUDIO not in by_path
    # no face: rows without video input, but the clip kept for the labelling page
    noface = by_path[NO_FACE]
    assert noface and all(not r["face_found"] and r["video_path"] is None for r in noface)
    assert all((out / r["clip_path"]).is_file() for r in noface)
    # a non-ASCII name: ASCII files, the original name kept
    named = by_path[NON_ASCII]
    assert len(named) == 2 and all(r["id"].isascii() for r in named)
    assert manifest[NON_ASCII]["status"] == "done"


def test_rerun_skips_finished_files_and_redoes_changed_ones(prepared, tmp_path):
    clips, original = prepared
    out = tmp_path / "out"
    shutil.copytree(original, out)
    before = (out / "metadata.jsonl").read_bytes()
    summary = P.prepare_dataset(clips, out, workers=1, progress=False)
    assert summary.already_done == summary.found == 5
    assert (summary.done, summary.skipped, summary.failed) == (0, 0, 0)
    assert (out / "metadata.jsonl").read_bytes() == before
    # a label set meanwhile survives a forced redo of an unchanged segment
    rows = _rows(out)
    rows[0]["endpoint_bool"], rows[0]["label_source"] = False, "manual"
    metafile.rewrite_jsonl(out / "metadata.jsonl", rows)
    summary = P.prepare_dataset(clips / GOOD, out, workers=1, progress=False, force=True)
    assert summary.done == 1
    after = {r["id"]: r for r in _rows(out)}
    assert len(after) == len(rows)
    assert after[rows[0]["id"]]["endpoint_bool"] is False


def test_an_interrupted_run_is_cleaned_up(prepared, tmp_path):
    clips, original = prepared
    out = tmp_path / "out"
    shutil.copytree(original, out)
    rows = _rows(out)
    # a crash mid-append, a temporary media file, rows of a file never recorded as done
    orphan = {**rows[0], "id": "ghost_000", "source": "ghost", "source_path": "ghost.mp4"}
    metafile.append_jsonl(out / "metadata.jsonl", [orphan])
    with open(out / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write('{"file_name": "audio/half')
    (out / "video" / ".speaker-1234.mp4").write_bytes(b"partial")
    summary = P.prepare_dataset(clips, out, workers=1, progress=False)
    assert summary.already_done == 5
    assert [r["id"] for r in _rows(out)] == [r["id"] for r in rows]
    assert (out / "metadata.jsonl").read_bytes().endswith(b"}\n")
    assert not (out / "video" / ".speaker-1234.mp4").exists()


def test_a_full_disk_stops_cleanly_and_a_rerun_finishes(prepared, tmp_path, monkeypatch):
    clips, original = prepared
    out = tmp_path / "out"
    calls = {"n": 0}
    real_write_video = P.write_video

    def failing_write_video(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-file: the last clip of the 2nd file with speech
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_video(path, *args, **kwargs)

    monkeypatch.setattr(P, "write_video", failing_write_video)
    lines = []
    summary = P.prepare_dataset(clips, out, workers=1, progress=False, log=lines.append)
    assert "disk full" in summary.stopped and "run prepare again" in summary.stopped
    assert summary.failed == 1 and any("No space left on device" in line for line in lines)
    rows = _rows(out)
    manifest = _manifest(out)
    failed = next(k for k, v in manifest.items() if v["status"] == "failed")
    assert failed not in {r["source_path"] for r in rows}  # none of its rows
    referenced = {r["file_name"] for r in rows} | {r["clip_path"] for r in rows}
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*")}
    assert on_disk == referenced  # none of its files, no temporary files
    assert all(manifest[r["source_path"]]["status"] == "done" for r in rows)

    monkeypatch.setattr(P, "write_video", real_write_video)
    summary = P.prepare_dataset(clips, out, workers=1, progress=False)
    assert not summary.stopped and summary.done >= 1
    assert sorted(r["id"] for r in _rows(out)) == sorted(r["id"] for r in _rows(original))


def test_an_append_that_fails_leaves_no_half_row(tmp_path, monkeypatch):
    path = tmp_path / "metadata.jsonl"
    metafile.append_jsonl(path, [{"id": "a"}])
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metafile.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        metafile.append_jsonl(path, [{"id": "b", "text": "x" * 1000}])
    monkeypatch.undo()
    assert path.read_bytes() == before
    # a reader also ignores a torn last line left by a crash
    path.write_bytes(before + b'{"id": "c", "te')
    assert metafile.read_jsonl(path) == [{"id": "a"}]
    assert metafile.repair_tail(path) > 0 and path.read_bytes() == before


def test_prepare_command_line(tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_talking_head(clips / "one.mp4", PHRASES[:2], seed=4)
    (clips / "one.txt").write_text(" ".join(PHRASES[:2]) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(clips), str(out), "--json", "--quiet", "--language", "en"])
    assert P.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["done"] == 1 and summary["segments"] == 2 and summary["files_per_s"] > 0
    assert {r["language"] for r in _rows(out)} == {"en"}
    assert {r["dataset"] for r in _rows(out)} == {"clips"}
    assert {r["transcript"] for r in _rows(out)} == {" ".join(PHRASES[:2])}  # the sidecar
    # a second run on the same folder while one is running is refused
    with metafile.locked(out, name=P.RUN_LOCK_NAME), pytest.raises(BlockingIOError):
        P.prepare_dataset(clips, out, progress=False)


def test_a_full_disk_while_appending_rows_removes_that_files_media(prepared, tmp_path, monkeypatch):
    clips, _ = prepared
    out = tmp_path / "out"
    real_append = metafile.append_jsonl
    calls = {"n": 0}

    def failing_append(path, rows):
        rows = list(rows)
        if Path(path).name == "metadata.jsonl" and rows:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_append(path, rows)

    monkeypatch.setattr(metafile, "append_jsonl", failing_append)
    summary = P.prepare_dataset(clips, out, workers=1, progress=False, log=lambda line: None)
    assert "disk full while appending to metadata.jsonl" in summary.stopped
    rows = _rows(out)
    assert {r["source_path"] for r in rows} == {NO_FACE}  # the first file with speech
    referenced = {r["file_name"] for r in rows} | {r["clip_path"] for r in rows}
    assert {p.relative_to(out).as_posix() for p in out.glob("*/*")} == referenced


@pytest.mark.slow
def test_a_killed_run_leaves_a_valid_dataset_and_resumes(prepared, tmp_path):
    """SIGKILL a real prepare run mid-way: no half row or file; a re-run completes it."""
    import subprocess
    import sys
    import time

    clips, original = prepared
    out = tmp_path / "out"
    code = (
        "import sys; from smart_turn_mm.prepare import prepare_dataset; "
        "prepare_dataset(sys.argv[1], sys.argv[2], workers=1, progress=False)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(clips), str(out)], stderr=subprocess.DEVNULL
    )
    meta = out / "metadata.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (meta.is_file() and meta.stat().st_size):
        time.sleep(0.02)
    time.sleep(0.3)  # into the next file
    process.kill()
    process.wait()
    for row in metafile.read_jsonl(meta):  # valid, and every row's files are complete
        assert (out / row["file_name"]).stat().st_size > 44
        with av.open(str(out / row["clip_path"])) as container:
            assert sum(1 for _ in container.decode(video=0)) > 0
    P.prepare_dataset(clips, out, workers=1, progress=False)
    assert sorted(r["id"] for r in _rows(out)) == sorted(r["id"] for r in _rows(original))
    assert not [p for p in out.glob("*/.*")]


def test_a_rewrite_is_atomic_and_keeps_permissions(tmp_path, monkeypatch):
    path = tmp_path / "metadata.jsonl"
    metafile.append_jsonl(path, [{"id": "a"}])
    path.chmod(0o640)
    metafile.rewrite_jsonl(path, [{"id": "b"}])
    assert path.stat().st_mode & 0o777 == 0o640
    monkeypatch.setattr(metafile.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        metafile.rewrite_jsonl(path, [{"id": "c"}])
    assert metafile.read_jsonl(path) == [{"id": "b"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.jsonl"]
