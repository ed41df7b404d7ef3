"""The synthetic audio-visual dataset: the real format, and cues that are really there."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from smart_turn_mm.dataset import METADATA_FIELDS
from smart_turn_mm.synthetic import (
    VIDEO_FPS,
    _face_timeline,
    _random_look,
    generate_dataset,
    render_face_frames,
    synth_speech,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("syn") / "d",
        recordings=5,
        segments_per_recording=4,
        video_seconds=0.5,
        seed=7,
        workers=1,
    )


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_writes_the_spec5_format(folder: Path) -> None:
    rows = _rows(folder)
    assert len(rows) == 20
    spec_fields = set(METADATA_FIELDS)
    for row in rows:
        assert spec_fields <= set(row) and row["synthetic"] is True
        assert isinstance(row["endpoint_bool"], bool)
        assert row["source"] == row["id"].rsplit("_", 1)[0]
        with wave.open(str(folder / row["file_name"])) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            assert 1.5 * 16000 < w.getnframes() < 3.4 * 16000
        if row["video_path"] is None:
            assert row["cue"] != "video"  # a face-only ending always has its face
            continue
        with av.open(str(folder / row["video_path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert float(stream.average_rate) == VIDEO_FPS
            assert (stream.width, stream.height) == (112, 112)
            assert sum(1 for _ in container.decode(stream)) == 15
    assert {r["cue"] for r in rows} == {"audio", "video", "both"}
    assert any(r["video_path"] is None for r in rows)


def test_is_deterministic_whatever_the_workers(folder: Path, tmp_path: Path) -> None:
    again = generate_dataset(
        tmp_path / "again",
        recordings=5,
        segments_per_recording=4,
        video_seconds=0.5,
        seed=7,
        workers=2,
    )
    assert _rows(again) == _rows(folder)
    first = _rows(folder)[0]["file_name"]
    assert (again / first).read_bytes() == (folder / first).read_bytes()


def _energy(x: np.ndarray, sr: int = 16000) -> np.ndarray:
    frames = x[: len(x) // 400 * 400].reshape(-1, 400)  # 25 ms frames
    return np.sqrt((frames**2).mean(axis=1))


def _pitch(x: np.ndarray, sr: int = 16000) -> float:
    """Fundamental frequency of a voiced stretch by autocorrelation (80-400 Hz)."""
    x = x - x.mean()
    ac = np.correlate(x, x, mode="full")[len(x) - 1 :]
    lo, hi = sr // 400, sr // 80
    return sr / (lo + int(np.argmax(ac[lo:hi])))


def test_audio_cue_is_pitch_and_energy() -> None:
    sr, speech = 16000, 2.0
    out = {}
    for pattern in ("fall", "rise", "level"):
        x = synth_speech(
            pattern, rng=np.random.default_rng(0), f0=150.0, speech_seconds=speech, noise=0.0
        )
        end = int(speech * sr)
        early = x[int(0.7 * sr) : int(0.9 * sr)]
        late = x[end - int(0.12 * sr) : end - int(0.02 * sr)]
        out[pattern] = (_pitch(late) / _pitch(early), _energy(late).mean() / _energy(early).mean())
        assert not x[end + 80 :].any()  # silence after the speech
    fall, rise, level = out["fall"], out["rise"], out["level"]
    assert fall[0] < 0.85 and rise[0] > 1.15 and 0.9 < level[0] < 1.1  # pitch contour
    assert fall[1] < 0.25 and rise[1] > 0.5 and level[1] > 0.5  # energy decays only on "fall"
    with pytest.raises(ValueError, match="pattern"):
        synth_speech("up", rng=np.random.default_rng(0))


def test_face_cue_is_mouth_gaze_and_nod() -> None:
    times = (np.arange(36) - 35) / VIDEO_FPS
    rng = np.random.default_rng(1)
    complete = _face_timeline("complete", times, -0.2, rng)
    incomplete = _face_timeline("incomplete", times, -0.2, rng)
    neutral = _face_timeline("neutral", times, -0.2, rng)
    assert complete["mouth"][-1] < 0.01 and abs(complete["gaze_x"][-1]) < 0.01  # closed, at us
    assert complete["dy"].max() > 5  # the nod
    assert incomplete["mouth"][-1] > 0.5 and abs(incomplete["gaze_x"][-1]) > 0.5
    assert incomplete["dy"].max() == 0
    assert neutral["mouth"][-1] < 0.01 and abs(neutral["gaze_x"][-1]) > 0.5
    # ... and it shows in the pixels: the mouth region is darker when open.
    look = _random_look(np.random.default_rng(2))
    frames_c = render_face_frames(look, complete, 112, np.random.default_rng(3))
    frames_i = render_face_frames(look, incomplete, 112, np.random.default_rng(3))
    assert frames_c.shape == (36, 112, 112, 3) and frames_c.dtype == np.uint8
    mouth = (slice(70, 95), slice(40, 72))
    assert frames_i[-1][mouth].mean() < frames_c[-1][mouth].mean() - 5
