"""``smart-turn-mm replay``: a recording streamed through the detector, the event timeline."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from talking_heads import have_espeak, speech_with_pauses, write_talking_head
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm import replay
from smart_turn_mm.media import write_wav
from smart_turn_mm.realtime import DetectorParams, EventKind

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    return replay.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def turn_wav(tmp_path_factory):
    audio, _ = speech_with_pauses(
        ["so I was going to, um", "What time is it?"], pause_s=1.0, tail_s=2.0
    )
    return write_wav(tmp_path_factory.mktemp("replay") / "turn.wav", audio)


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    return tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm")


def test_fast_replay_timeline_and_summary(turn_wav, v32_onnx):
    seen = []
    result = replay.replay(turn_wav, model=v32_onnx, speed=0, on_event=seen.append)
    assert seen == result.events
    kinds = [e.kind for e in result.events]
    assert kinds[0] is EventKind.SPEECH_START and kinds[-1] is EventKind.TURN_COMPLETE
    s = result.summary
    assert s["turns_started"] == 1 and s["turns_completed"] == 1 and s["commits_by_model"] == 1
    assert s["decisions"] >= 2 and s["decisions_with_video"] == 0
    assert s["delay_after_redemption_ms"]["median"] is not None
    assert 5 < result.audio_s < 8 and result.frames == 0
    # The same timeline again, with other chunk sizes.
    again = replay.replay(turn_wav, model=v32_onnx, speed=0, chunk_ms=100)
    assert [(e.kind, e.time_s) for e in again.events] == [(e.kind, e.time_s) for e in result.events]


def test_real_time_replay_hides_the_model_time(turn_wav, v32_onnx):
    """At 2x real time the redemption time is 150 ms of wall time, about the model's time here."""
    result = replay.replay(turn_wav, model=v32_onnx, speed=2.0)
    assert result.wall_s >= result.audio_s / 2 - 0.05  # paced, not as fast as possible
    assert result.summary["turns_completed"] == 1
    delays = [e.delay_after_redemption_ms for e in result.events if e.model_ms is not None]
    model = [e.model_ms for e in result.events if e.model_ms is not None]
    assert delays and np.median(delays) < np.median(model)


def test_replay_with_video(tmp_path, tiny_mm):
    clip = tmp_path / "talk.mp4"
    write_talking_head(clip, ["hello there my friend", "how are you today"], fps=25)
    params = DetectorParams(threshold=1.0, max_silence_ms=600)
    result = replay.replay(clip, clip, model=tiny_mm, params=params, speed=0)
    assert result.frames > 50
    decisions = [e for e in result.events if e.kind is EventKind.DECISION]
    assert decisions and all(e.av_probability is not None and e.face_found for e in decisions)
    assert result.summary["decisions_with_video"] == len(decisions)
    assert result.summary["commits_by_max_silence"] == 2


def test_cli_text_and_json(turn_wav, v32_onnx, capsys):
    assert cli(str(turn_wav), "-m", str(v32_onnx), "--fast", "--redemption", "fast") == 0
    out = capsys.readouterr().out
    assert "speech_start" in out and "turn_complete" in out and "redemption 200 ms" in out
    assert "delay after redemption: median" in out
    argv = ["--fast", "--json", "--threshold", "0.99", "--max-silence-ms", "1500"]
    assert cli(str(turn_wav), "-m", str(v32_onnx), *argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["threshold"] == 0.99
    assert {e["kind"] for e in data["events"]} >= {"speech_start", "speech_end", "decision"}
    assert data["summary"]["commits_by_max_silence"] == 1


def test_cli_errors(tmp_path, v32_onnx):
    with pytest.raises(FileNotFoundError):
        cli(str(tmp_path / "missing.wav"), "-m", str(v32_onnx), "--fast")
    wav = write_wav(tmp_path / "x.wav", np.zeros(1600, np.float32))
    with pytest.raises(FileNotFoundError, match="video file not found"):
        cli(str(wav), str(tmp_path / "missing.mp4"), "-m", str(v32_onnx), "--fast")
    with pytest.raises(ValueError, match="speed"):
        replay.replay(wav, model=v32_onnx, speed=-1)
