"""The Pipecat turn analyzer and frame feeder, against the real ``pipecat-ai`` package."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai (the pipecat extra) is not installed")

from media import face_frames
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, EndOfTurnState
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InputImageRawFrame,
    TextFrame,
    UserImageRawFrame,
)
from pipecat.metrics.metrics import TurnMetricsData
from pipecat.tests.utils import run_test
from talking_heads import espeak, have_espeak
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.pipecat_turn import (
    SmartTurnMultimodalAnalyzer,
    VideoFrameFeeder,
    image_to_rgb,
)

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)")


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    return tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm")


def question_pcm(
    rate: int = 16000, text: str = "Can you tell me the weather in Paris?"
) -> tuple[bytes, int]:
    """0.5 s silence + ``text`` + 0.2 s silence as int16 bytes, and where the speech ends."""
    speech = espeak(text)
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(3200, np.float32)])
    if rate != 16000:
        from smart_turn_mm.audio import _resample

        audio = _resample(audio, 16000, rate)
    return (audio * 32767).astype(np.int16).tobytes(), round((8000 + len(speech)) * rate / 16000)


def analyze(analyzer: BaseTurnAnalyzer, pcm: bytes, speech_samples: int, rate: int = 16000):
    """Feed 20 ms frames as Pipecat's stop strategy does, then ask for the decision."""
    analyzer.set_sample_rate(rate)
    step = rate // 50
    for i in range(0, len(pcm) // 2, step):
        analyzer.append_audio(pcm[2 * i : 2 * (i + step)], is_speech=8000 <= i < speech_samples)
    return asyncio.run(analyzer.analyze_end_of_turn())


@needs_espeak
def test_audio_only_model_is_a_pipecat_analyzer(v32_onnx):
    analyzer = SmartTurnMultimodalAnalyzer(model=v32_onnx)
    assert isinstance(analyzer, BaseTurnAnalyzer) and not analyzer.has_video
    assert analyzer.push_image(face_frames(1)[0]) is False  # ignored without a video branch
    pcm, speech = question_pcm()
    state, metrics = analyze(analyzer, pcm, speech)
    assert state is EndOfTurnState.COMPLETE
    assert isinstance(metrics, TurnMetricsData) and metrics.is_complete
    assert metrics.probability > 0.5 and metrics.e2e_processing_time_ms > 0
    assert analyzer.last_scores.av_probability is None
    # The same decision at Pipecat's other common rate (resampled to 16 kHz).
    analyzer.clear()
    pcm, speech = question_pcm(24000)
    assert analyze(analyzer, pcm, speech, 24000)[0] is EndOfTurnState.COMPLETE
    # A filler ending is not the end of the turn.
    analyzer.clear()
    pcm, speech = question_pcm(text="so I was going to, um")
    state, metrics = analyze(analyzer, pcm, speech)
    assert state is EndOfTurnState.INCOMPLETE and metrics.probability < 0.1


@needs_espeak
def test_video_frames_are_used_and_audio_only_fallback(tiny_mm):
    analyzer = SmartTurnMultimodalAnalyzer(model=tiny_mm, threshold=0.0)
    assert analyzer.has_video
    pcm, speech = question_pcm()
    # No frames: audio only (the zero video embedding).
    state, _ = analyze(analyzer, pcm, speech)
    assert state is EndOfTurnState.COMPLETE and analyzer.last_scores.av_probability is None
    # Frames of the user's face: both probabilities.
    for frame in face_frames(40, 240, 320):
        assert analyzer.push_image(frame.tobytes(), (320, 240), "RGB")
    analyzer.clear()
    state, metrics = analyze(analyzer, pcm, speech)
    scores = analyzer.last_scores
    assert scores.av_probability is not None and scores.face_found
    assert scores.num_frames == analyzer.model.num_frames
    assert metrics.probability == pytest.approx(scores.av_probability)
    # Frames older than max_frame_age_secs are not used.
    stale = SmartTurnMultimodalAnalyzer(model=tiny_mm, max_frame_age_secs=0.2)
    for frame in face_frames(10):
        stale.push_image(frame, timestamp=time.monotonic() - 1.0)
    assert stale.recent_frames() == []
    analyze(stale, pcm, speech)
    assert stale.last_scores.av_probability is None


def test_image_formats():
    rgb = face_frames(1, 48, 64, face=False)[0]
    assert np.array_equal(image_to_rgb(rgb.tobytes(), (64, 48), "RGB"), rgb)
    assert np.array_equal(image_to_rgb(rgb.tobytes(), (64, 48), None), rgb)
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(image_to_rgb(rgba.tobytes(), (64, 48), "RGBA"), rgb)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert np.array_equal(image_to_rgb(bgr.tobytes(), (64, 48), "BGR"), rgb)
    import av

    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    jpeg = b"".join(bytes(p) for p in codec.encode(frame))
    decoded = image_to_rgb(jpeg, (64, 48), "JPEG")
    assert decoded.shape == rgb.shape and np.abs(decoded.astype(int) - rgb).mean() < 12
    with pytest.raises(ValueError, match="needs 9216 bytes"):
        image_to_rgb(rgb.tobytes()[:-3], (64, 48), "RGB")
    with pytest.raises(ValueError, match="unsupported image format"):
        image_to_rgb(rgb.tobytes(), (64, 48), "YUV420")
    with pytest.raises(ValueError, match="cannot decode JPEG"):
        image_to_rgb(b"\xff\xd8garbage", (64, 48), "JPEG")


def test_feeder_in_a_real_pipeline(tiny_mm):
    analyzer = SmartTurnMultimodalAnalyzer(model=tiny_mm)
    feeder = VideoFrameFeeder(analyzer)
    frames = face_frames(5, 120, 160)
    to_send = [
        *[InputImageRawFrame(image=f.tobytes(), size=(160, 120), format="RGB") for f in frames],
        UserImageRawFrame(image=frames[0].tobytes(), size=(160, 120), format="RGB", user_id="u1"),
        InputImageRawFrame(image=b"\x00" * 10, size=(160, 120), format="RGB"),  # bad: logged
        InputAudioRawFrame(audio=b"\x00" * 640, sample_rate=16000, num_channels=1),
        TextFrame(text="hello"),
    ]
    down, _ = asyncio.run(
        run_test(
            feeder,
            frames_to_send=to_send,
            expected_down_frames=[
                *[InputImageRawFrame] * 5,
                UserImageRawFrame,
                InputImageRawFrame,
                InputAudioRawFrame,
                TextFrame,
            ],
        )
    )
    assert len(down) == len(to_send)  # every frame passes on unchanged
    assert feeder.frames_fed == 6
    assert len(analyzer.recent_frames()) == 6
    # Filters: only one user's frames.
    only_u2 = VideoFrameFeeder(SmartTurnMultimodalAnalyzer(model=tiny_mm), user_id="u2")
    asyncio.run(run_test(only_u2, frames_to_send=to_send[:6]))
    assert only_u2.frames_fed == 0


def test_works_with_pipecats_turn_stop_strategy(tiny_mm):
    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    analyzer = SmartTurnMultimodalAnalyzer(model=tiny_mm)
    strategies = UserTurnStrategies(stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=analyzer)])
    assert strategies.stop[0]._turn_analyzer is analyzer
    assert analyzer.params.stop_secs == 3
