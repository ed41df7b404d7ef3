"""Silero VAD on ONNX Runtime: model file resolution, streaming, offline segments."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from talking_heads import have_espeak, speech_with_pauses

from smart_turn_mm import vad
from smart_turn_mm.audio import _resample
from smart_turn_mm.vad import CHUNK_SAMPLES, SileroVAD, speech_segments, vad_model_path

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)")


def test_model_path_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(vad.VAD_MODEL_ENV, raising=False)
    found = vad_model_path()
    assert found.name == "silero_vad.onnx" and found.is_file()
    with pytest.raises(FileNotFoundError, match="not found"):
        vad_model_path(tmp_path / "missing.onnx")
    monkeypatch.setenv(vad.VAD_MODEL_ENV, str(found))
    assert vad_model_path() == found
    monkeypatch.setenv(vad.VAD_MODEL_ENV, str(tmp_path / "nope.onnx"))
    with pytest.raises(FileNotFoundError, match="SMART_TURN_MM_VAD_MODEL"):
        vad_model_path()
    monkeypatch.delenv(vad.VAD_MODEL_ENV)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps silero-vad"):
        vad_model_path()


def test_pipecat_copy_is_the_fallback(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.delenv(vad.VAD_MODEL_ENV, raising=False)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n: None if n == "silero_vad" else real(n)
    )
    path = vad_model_path()
    assert path.parts[-4:] == ("audio", "vad", "data", "silero_vad.onnx")
    assert 0.0 <= SileroVAD(path)(np.zeros(CHUNK_SAMPLES, np.float32)) < 0.1


def test_not_a_vad_model(v32_onnx):
    with pytest.raises(ValueError, match="not a Silero VAD"):
        SileroVAD(v32_onnx)


def test_chunk_size_is_checked():
    model = SileroVAD()
    for bad in (np.zeros(511, np.float32), np.zeros((1, 512), np.float32)):
        with pytest.raises(ValueError, match="512"):
            model(bad)


@needs_espeak
def test_streaming_matches_offline_and_reset():
    audio, spans = speech_with_pauses(["hello there", "how are you"], pause_s=0.8)
    model = SileroVAD()
    offline = model.probabilities(audio)
    streamed = [model(audio[i : i + CHUNK_SAMPLES]) for i in range(0, len(audio) - 511, 512)]
    np.testing.assert_allclose(streamed, offline[: len(streamed)], atol=1e-6)
    model.reset()
    again = [model(audio[i : i + CHUNK_SAMPLES]) for i in range(0, len(audio) - 511, 512)]
    np.testing.assert_allclose(again, streamed, atol=1e-6)
    # Speech inside the phrases, silence in the pause and before the first phrase.
    t = (np.arange(len(offline)) + 0.5) * CHUNK_SAMPLES / 16000
    inside = (t > spans[0][0] + 0.1) & (t < spans[0][1] - 0.1)
    pause = (t > spans[0][1] + 0.3) & (t < spans[1][0] - 0.1)
    assert offline[inside].mean() > 0.7
    assert offline[pause].max() < 0.2 and offline[t < spans[0][0] - 0.1].max() < 0.2


@needs_espeak
def test_same_probabilities_as_silero_package():
    """Our numpy wrapper vs the silero-vad package's own ONNX wrapper (needs torch)."""
    pytest.importorskip("torch")
    utils = pytest.importorskip("silero_vad.utils_vad")
    import torch

    audio, _ = speech_with_pauses(["one two three"], pause_s=0.5)
    ours = SileroVAD().probabilities(audio)
    reference = utils.OnnxWrapper(str(vad_model_path()), force_onnx_cpu=True)
    theirs = [
        float(reference(torch.from_numpy(audio[i : i + 512].copy()), 16000))
        for i in range(0, len(audio) - 511, 512)
    ]
    np.testing.assert_allclose(ours[: len(theirs)], theirs, atol=1e-5)


@needs_espeak
def test_speech_segments_follow_the_phrases():
    phrases = ["I went to the market", "and then I bought apples", "that is all"]
    audio, spans = speech_with_pauses(phrases, pause_s=0.9)
    segments = speech_segments(audio)
    assert len(segments) == 3
    for (start, end), (s, e) in zip(segments, spans, strict=True):
        assert abs(start / 16000 - s) < 0.12 and abs(end / 16000 - e) < 0.25
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(segments))
    # A longer minimum silence merges phrases separated by shorter pauses.
    assert len(speech_segments(audio, min_silence_ms=1500)) == 1
    # Segments shorter than min_speech_ms are dropped.
    assert speech_segments(audio, min_speech_ms=5000) == []
    # Other sample rates are resampled first; positions stay at 16 kHz.
    at_48k = _resample(audio, 16000, 48000)
    assert len(speech_segments(at_48k, sample_rate=48000)) == 3


def test_speech_segments_of_silence_and_bad_arguments():
    assert speech_segments(np.zeros(16000, np.float32)) == []
    with pytest.raises(ValueError, match="threshold"):
        speech_segments(np.zeros(16000, np.float32), threshold=1.5)
    with pytest.raises(ValueError, match="min_silence_ms"):
        speech_segments(np.zeros(16000, np.float32), min_silence_ms=-1)


def test_import_needs_no_torch_silero_or_pipecat():
    code = (
        "import sys, smart_turn_mm.vad, smart_turn_mm.realtime, smart_turn_mm.replay,"
        " smart_turn_mm.demo.server;"
        "smart_turn_mm.vad.SileroVAD()(__import__('numpy').zeros(512, 'float32'));"
        "bad = [m for m in ('torch', 'silero_vad', 'pipecat', 'transformers', 'cv2')"
        " if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
