"""The streaming detector: state machine (scripted VAD and model), real models on espeak-ng
speech with real pauses, video, latency hiding, timestamps, memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from media import face_frames
from talking_heads import espeak, have_espeak
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm import realtime
from smart_turn_mm.audio import _resample
from smart_turn_mm.inference import load_model
from smart_turn_mm.realtime import (
    DetectorParams,
    EventKind,
    RedemptionPreset,
    Sensitivity,
    TurnDetector,
)

SR = 16000
CHUNK_S = 512 / SR
needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)")


class LoudnessVAD:
    """A scripted VAD: speech when the chunk is loud."""

    def reset(self) -> None:
        pass

    def __call__(self, chunk: np.ndarray) -> float:
        return 0.95 if float(np.sqrt(np.mean(chunk**2))) > 0.05 else 0.02


class FakeModel:
    """An audio-only model returning scripted probabilities (optionally slowly)."""

    has_video = False
    num_frames = None
    frame_size = None

    def __init__(self, probability=0.9, delay_s: float = 0.0) -> None:
        self.probability = probability
        self.delay_s = delay_s
        self.calls = 0

    def predict(self, features, pixels=None):
        assert features.shape == (1, 80, 800) and pixels is None
        self.calls += 1
        time.sleep(self.delay_s)
        p = self.probability(self.calls) if callable(self.probability) else self.probability
        return np.array([p], np.float32)


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), np.float32)


def feed(detector: TurnDetector, audio: np.ndarray, chunk: int = 320) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += detector.push_audio(audio[i : i + chunk])
    return events


def kinds(events) -> list[str]:
    return [e.kind.value for e in events]


def make(model=None, vad=None, **params) -> TurnDetector:
    return TurnDetector(
        model if model is not None else FakeModel(),
        params=DetectorParams(**params),
        vad=vad if vad is not None else LoudnessVAD(),
    )


# --------------------------------------------------------------------------- params


def test_presets_and_params():
    assert RedemptionPreset.FAST.value == 200 and RedemptionPreset.BALANCED.value == 300
    assert RedemptionPreset.RELAXED.value == 500
    assert (Sensitivity.AGGRESSIVE.value, Sensitivity.NORMAL.value) == (0.3, 0.5)
    assert Sensitivity.CONSERVATIVE.value == 0.7
    default = DetectorParams()
    assert (default.redemption_ms, default.threshold) == (300, 0.5)
    p = DetectorParams.preset("fast", Sensitivity.CONSERVATIVE, max_silence_ms=2000)
    assert (p.redemption_ms, p.threshold, p.max_silence_ms) == (200, 0.7, 2000)
    assert p.replace(threshold=0.4).threshold == 0.4
    with pytest.raises(ValueError, match="unknown RedemptionPreset"):
        DetectorParams.preset("sluggish")
    for bad in (
        {"threshold": 1.5},
        {"redemption_ms": -1},
        {"redemption_ms": 4000},  # above max_silence_ms
        {"vad_threshold": 0.0},
        {"recheck_interval_ms": 5},
        {"max_silence_ms": float("nan")},
    ):
        with pytest.raises(ValueError):
            DetectorParams(**bad)
    with pytest.raises(TypeError):
        TurnDetector(FakeModel(), params={"threshold": 0.5}, vad=LoudnessVAD())
    with pytest.raises(TypeError, match="model must be"):
        TurnDetector(42, vad=LoudnessVAD())


# --------------------------------------------------------------------------- state machine


def test_commit_after_redemption_time_when_the_model_agrees():
    model = FakeModel(0.9)
    d = make(model)
    events = feed(d, np.concatenate([silence(0.5), tone(1.0), silence(1.5)]))
    assert kinds(events) == ["speech_start", "speech_end", "turn_complete"]
    start, end, done = events
    assert abs(start.time_s - 0.5) <= CHUNK_S and abs(end.time_s - 1.5) <= CHUNK_S
    assert done.reason == "model" and done.probability == pytest.approx(0.9)
    assert 300 <= done.silence_ms < 300 + 1000 * CHUNK_S
    assert done.time_s - end.time_s == pytest.approx(done.silence_ms / 1000)
    assert done.model_ms is not None and done.delay_after_redemption_ms >= 0
    assert done.audio_probability == pytest.approx(0.9) and done.av_probability is None
    assert model.calls == 1 and d.state == "idle" and d.turn_id == 1


@pytest.mark.parametrize("preset", list(RedemptionPreset))
def test_redemption_presets(preset):
    d = make(redemption_ms=preset.value)
    done = feed(d, np.concatenate([tone(0.6), silence(1.2)]))[-1]
    assert done.kind is EventKind.TURN_COMPLETE
    assert preset.value <= done.silence_ms < preset.value + 1000 * CHUNK_S


@pytest.mark.parametrize(
    ("sensitivity", "commits"),
    [(Sensitivity.AGGRESSIVE, True), (Sensitivity.NORMAL, True), (Sensitivity.CONSERVATIVE, False)],
)
def test_sensitivity(sensitivity, commits):
    d = make(FakeModel(0.6), threshold=sensitivity.value, max_silence_ms=3000)
    events = feed(d, np.concatenate([tone(0.6), silence(0.6)]))
    assert (events[-1].kind is EventKind.TURN_COMPLETE) == commits
    if not commits:
        assert events[-1].kind is EventKind.DECISION and events[-1].probability == pytest.approx(
            0.6
        )


def test_rechecks_then_max_silence_fallback():
    model = FakeModel(0.1)
    d = make(model, recheck_interval_ms=250, max_silence_ms=1500)
    events = feed(d, np.concatenate([tone(0.6), silence(2.0)]))
    decisions = [e for e in events if e.kind is EventKind.DECISION]
    assert kinds(events)[:2] == ["speech_start", "speech_end"]
    assert len(decisions) == 5  # at 300, 550, 800, 1050, 1300 ms of silence
    assert model.calls in (5, 6)  # the re-check started at 1300 ms may run before it is dropped
    gaps = np.diff([e.silence_ms for e in decisions])
    assert np.all(np.abs(gaps - 250) <= 1000 * CHUNK_S)
    last = events[-1]
    assert last.kind is EventKind.TURN_COMPLETE and last.reason == "max_silence"
    assert 1500 <= last.silence_ms < 1500 + 1000 * CHUNK_S
    assert last.probability == pytest.approx(0.1)  # the latest model opinion


def test_a_later_recheck_can_commit():
    d = make(FakeModel(lambda call: 0.2 if call < 3 else 0.8))
    events = feed(d, np.concatenate([tone(0.6), silence(1.5)]))
    assert kinds(events) == ["speech_start", "speech_end", "decision", "decision", "turn_complete"]


def test_speech_resuming_cancels_the_pending_decision():
    model = FakeModel(0.9)
    d = make(model)
    audio = np.concatenate([tone(0.8), silence(0.2), tone(0.8), silence(1.0)])
    events = feed(d, audio)
    assert kinds(events) == [
        "speech_start",
        "speech_end",
        "cancelled",
        "speech_start",
        "speech_end",
        "turn_complete",
    ]
    assert events[3].resumed and events[3].turn_id == 1 == events[-1].turn_id
    assert events[2].silence_ms < 300


def test_resumed_speech_after_an_incomplete_decision():
    d = make(FakeModel(lambda call: 0.1 if call == 1 else 0.9))
    audio = np.concatenate(
        [tone(0.8), silence(0.5), tone(0.5), silence(0.8), tone(0.4), silence(1)]
    )
    events = feed(d, audio)
    assert kinds(events) == [
        "speech_start",
        "speech_end",
        "decision",
        "cancelled",  # the re-check started after the decision
        "speech_start",
        "speech_end",
        "turn_complete",
        "speech_start",
        "speech_end",
        "turn_complete",
    ]
    assert [e.turn_id for e in events if e.kind is EventKind.TURN_COMPLETE] == [1, 2]


def test_short_blips_and_dips_are_ignored():
    d = make()
    # A 40 ms click does not start a turn; a 40 ms dip inside speech does not pause it.
    audio = np.concatenate(
        [silence(0.5), tone(0.04), silence(0.5), tone(0.5), silence(0.04), tone(0.5), silence(1)]
    )
    assert kinds(feed(d, audio)) == ["speech_start", "speech_end", "turn_complete"]


def test_pre_roll_and_8_second_window(monkeypatch):
    seen = []
    original = realtime.score_turn

    def spy(model, audio, frames=None, **kw):
        seen.append(len(audio))
        return original(model, audio, frames, **kw)

    monkeypatch.setattr(realtime, "score_turn", spy)
    d = make(pre_roll_ms=500, fill_silence=False)
    feed(d, np.concatenate([silence(2.0), tone(1.0), silence(1.0)]))
    # pre-roll + speech + the silence confirmed at launch (64 ms, then the chunk boundary)
    assert 1.5 * SR < seen[0] < 1.6 * SR + 1024
    seen.clear()
    d = make(fill_silence=False)
    feed(d, np.concatenate([silence(1.0), tone(12.0), silence(1.0)]))
    assert seen[0] == 8 * SR  # only the last 8 s


def test_latency_hiding_starts_the_model_at_silence_onset(monkeypatch):
    """The model starts at silence onset; the snapshot is padded with zeros up to the due
    time, so a 200 ms model is ready when the 500 ms redemption time ends."""
    launched_at = []
    original = realtime.TurnDetector._launch

    def spy(self, due):
        launched_at.append((self.time_s, due / SR))
        return original(self, due)

    monkeypatch.setattr(realtime.TurnDetector, "_launch", spy)
    model = FakeModel(0.9, delay_s=0.2)
    d = make(model, redemption_ms=500)
    audio = np.concatenate([tone(0.6), silence(1.0)])
    events = []
    t0 = time.perf_counter()
    for i in range(0, len(audio), 320):  # real time
        events += d.push_audio(audio[i : i + 320])
        time.sleep(max(0.0, t0 + (i + 320) / SR - time.perf_counter()))
    end = next(e for e in events if e.kind is EventKind.SPEECH_END)
    done = events[-1]
    start_s, due_s = launched_at[0]
    assert start_s - end.time_s <= 0.064 + 2 * CHUNK_S  # at onset (after min_silence_ms)
    assert due_s == pytest.approx(end.time_s + 0.5)
    assert done.kind is EventKind.TURN_COMPLETE and done.model_ms >= 200
    assert done.delay_after_redemption_ms < 100  # hidden behind the redemption time


def test_wait_for_model_makes_fast_replay_deterministic():
    audio = np.concatenate([tone(0.6), silence(1.2)])
    slow = make(FakeModel(0.9, delay_s=0.3))
    events = slow.push_audio(audio)  # all at once: the due decision is waited for
    assert kinds(events) == ["speech_start", "speech_end", "turn_complete"]
    assert events[-1].delay_after_redemption_ms >= 250  # measured: the model's time


def test_live_mode_never_blocks_and_poll_delivers():
    ready = threading.Event()
    d = TurnDetector(
        FakeModel(0.9, delay_s=0.3),
        vad=LoudnessVAD(),
        wait_for_model=False,
        on_ready=ready.set,
    )
    t0 = time.perf_counter()
    events = d.push_audio(np.concatenate([tone(0.6), silence(0.6)]))
    assert time.perf_counter() - t0 < 0.25
    assert kinds(events) == ["speech_start", "speech_end"] and d.decision_pending
    assert ready.wait(5)
    late = d.poll()
    assert kinds(late) == ["turn_complete"] and late[0].delay_after_redemption_ms > 0
    assert not d.decision_pending and d.poll() == []
    # Speech that resumes before a late decision is delivered cancels it.
    ready.clear()
    d.push_audio(np.concatenate([tone(0.6), silence(0.4)]))
    assert kinds(d.push_audio(tone(0.3))) == ["cancelled", "speech_start"]
    d.close()


def test_model_failure_falls_back_to_max_silence(caplog):
    class Broken(FakeModel):
        def predict(self, features, pixels=None):
            raise RuntimeError("boom")

    d = make(Broken(), max_silence_ms=800)
    events = feed(d, np.concatenate([tone(0.6), silence(1.0)]))
    assert events[-1].kind is EventKind.TURN_COMPLETE and events[-1].reason == "max_silence"
    assert "model run failed: RuntimeError: boom" in caplog.text


def test_live_params_switch():
    d = make(FakeModel(0.6))
    feed(d, tone(0.5))
    d.params = DetectorParams.preset("fast", "conservative")
    events = feed(d, silence(0.5))
    assert events[-1].kind is EventKind.DECISION  # 0.6 < 0.7
    d.params = d.params.replace(threshold=0.5)
    assert feed(d, silence(0.5))[-1].kind is EventKind.TURN_COMPLETE
    with pytest.raises(TypeError):
        d.params = {"threshold": 0.5}


# --------------------------------------------------------------------------- input handling


def test_chunk_sizes_and_sample_rates_give_the_same_timeline():
    audio = np.concatenate([silence(0.3), tone(0.7), silence(0.25), tone(0.5), silence(1.2)])

    def timeline(detector, pieces):
        events = []
        for piece, rate in pieces:
            events += detector.push_audio(piece, sample_rate=rate)
        return [(e.kind.value, round(e.time_s, 3)) for e in events]

    reference = timeline(make(), [(audio, SR)])
    assert timeline(make(), [(audio[i : i + 160], SR) for i in range(0, len(audio), 160)]) == (
        reference
    )
    assert timeline(make(), [(audio[i : i + 7777], SR) for i in range(0, len(audio), 7777)]) == (
        reference
    )
    at_48k = _resample(audio, SR, 48000)
    resampled = timeline(make(), [(at_48k[i : i + 960], 48000) for i in range(0, len(at_48k), 960)])
    assert [k for k, _ in resampled] == [k for k, _ in reference]
    assert np.allclose([t for _, t in resampled], [t for _, t in reference], atol=CHUNK_S)
    pcm = (audio * 32767).astype(np.int16)
    stereo = np.stack([pcm, pcm], axis=1)
    assert timeline(make(), [(stereo, SR)]) == reference


def test_timestamps_gaps_and_out_of_order():
    d = make()
    d.push_audio(tone(0.5), timestamp_s=10.0)
    assert d.time_s == pytest.approx(10.0 + 0.5 - (0.5 * SR % 512) / SR)
    d.push_audio(tone(0.1), timestamp_s=10.55)  # 50 ms late: jitter, no gap
    with pytest.raises(ValueError, match="behind the stream clock"):
        d.push_audio(tone(0.1), timestamp_s=10.3)
    with pytest.raises(ValueError, match="ahead of the stream clock"):
        d.push_audio(tone(0.1), timestamp_s=100.0)
    # A 1 s gap (lost packets) is filled with silence: the pause starts and the turn ends.
    events = d.push_audio(silence(0.02), timestamp_s=11.65)
    assert kinds(events) == ["speech_end", "turn_complete"]
    assert events[0].time_s == pytest.approx(10.6, abs=CHUNK_S)
    assert d.push_audio(np.zeros(0, np.float32)) == []
    with pytest.raises(ValueError, match="NaN"):
        d.push_audio(np.full(320, np.nan, np.float32))
    with pytest.raises(TypeError):
        d.push_audio(np.zeros(320, np.uint8))
    with pytest.raises(ValueError, match="sample_rate"):
        d.push_audio(tone(0.1), sample_rate=0)


def test_reset_and_close():
    d = make()
    feed(d, tone(0.5))
    assert d.state == "speech"
    d.reset()
    assert (d.state, d.turn_id, d.time_s) == ("idle", 0, 0.0)
    d.close()
    d.close()
    with pytest.raises(RuntimeError, match="closed"):
        d.push_audio(tone(0.1))


# --------------------------------------------------------------------------- real models


def conversation(*parts) -> np.ndarray:
    return np.concatenate([espeak(p) if isinstance(p, str) else silence(p) for p in parts])


@needs_espeak
def test_real_speech_with_the_v32_model(v32_onnx):
    """Real Smart Turn v3.2 on espeak-ng speech: the pause after a filler is not the end of the
    turn; the question is."""
    audio = conversation(0.5, "so I was going to, um", 1.0, "What time is it?", 2.0)
    d = TurnDetector(v32_onnx)
    events = d.push_audio(audio)
    commits = [i for i, e in enumerate(events) if e.kind is EventKind.TURN_COMPLETE]
    assert len(commits) == 1
    done = events[commits[0]]
    assert done.reason == "model" and done.probability > 0.5
    before = events[: commits[0]]
    # The pause after "um" got "incomplete" decisions, then the speech resumed.
    incomplete = [e for e in before if e.kind is EventKind.DECISION]
    assert incomplete and all(e.probability < 0.5 for e in incomplete)
    assert before[-2].kind is EventKind.SPEECH_START and before[-2].resumed
    assert all(e.turn_id == 1 for e in events)
    # Replaying again (new detector, other chunking) gives the same timeline.
    again = TurnDetector(v32_onnx)
    events2 = [e for i in range(0, len(audio), 4000) for e in again.push_audio(audio[i : i + 4000])]
    assert [(e.kind, e.time_s, e.probability) for e in events2] == [
        (e.kind, e.time_s, e.probability) for e in events
    ]


@needs_espeak
def test_complete_question_commits_at_the_first_decision(v32_onnx):
    d = TurnDetector(v32_onnx, params=DetectorParams.preset("fast"))
    events = d.push_audio(conversation(0.5, "What time is it?", 1.0))
    assert kinds(events) == ["speech_start", "speech_end", "turn_complete"]
    assert events[-1].silence_ms < 200 + 1000 * CHUNK_S


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory):
    return load_model(tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm"))


class CountingModel:
    """Wraps a split TurnModel and counts the calls of each part."""

    def __init__(self, model) -> None:
        self._model = model
        self.counts = {"audio_embedding": 0, "video_embedding": 0, "head": 0}

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name in self.counts:

            def counted(*args, **kwargs):
                self.counts[name] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def push_av(d: TurnDetector, audio: np.ndarray, frames, fps: float = 25.0, chunk: int = 640):
    """Interleave audio chunks and frames by time; frames stop when ``frames`` runs out."""
    events, k = [], 0
    for i in range(0, len(audio), chunk):
        end_s = (i + chunk) / SR
        while k < len(frames) and k / fps <= end_s:
            d.push_frame(frames[k], k / fps)
            k += 1
        events += d.push_audio(audio[i : i + chunk])
    return events


def test_video_gives_both_probabilities(tiny_mm):
    model = CountingModel(tiny_mm)
    d = TurnDetector(model, vad=LoudnessVAD(), params=DetectorParams(threshold=1.0))
    audio = np.concatenate([tone(1.0), silence(0.5)])
    frames = face_frames(40, 240, 320)
    events = push_av(d, audio, frames)
    decision = next(e for e in events if e.kind is EventKind.DECISION)
    assert decision.av_probability is not None and decision.face_found is True
    assert decision.num_frames == tiny_mm.num_frames
    assert decision.probability == decision.av_probability != decision.audio_probability
    assert set(decision.timings_ms) == {"features", "video", "model"}
    # One audio embedding, one video embedding and two head runs per decision.
    assert model.counts == {"audio_embedding": 1, "video_embedding": 1, "head": 2}
    crop = d.last_scores.face_crop
    assert crop.shape == (tiny_mm.frame_size, tiny_mm.frame_size, 3) and crop.dtype == np.uint8


def test_no_face_old_frames_and_audio_only_models(tiny_mm, v32_onnx):
    audio = np.concatenate([tone(1.0), silence(0.5)])
    params = DetectorParams(threshold=1.0)
    # No face in the frames: the zero video embedding (SPEC 2).
    d = TurnDetector(tiny_mm, vad=LoudnessVAD(), params=params)
    decision = next(
        e for e in push_av(d, audio, face_frames(40, face=False)) if e.kind is EventKind.DECISION
    )
    assert decision.face_found is False and decision.av_probability is None
    assert decision.probability == decision.audio_probability
    # ... unless require_face=False: the centre crop is used.
    d = TurnDetector(tiny_mm, vad=LoudnessVAD(), params=params.replace(require_face=False))
    decision = next(
        e for e in push_av(d, audio, face_frames(40, face=False)) if e.kind is EventKind.DECISION
    )
    assert decision.face_found is False and decision.av_probability is not None
    # Frames that stopped 1 s before the pause are too old.
    d = TurnDetector(tiny_mm, vad=LoudnessVAD(), params=params)
    decision = next(e for e in push_av(d, audio, face_frames(3)) if e.kind is EventKind.DECISION)
    assert decision.av_probability is None and decision.num_frames == 0
    # use_video=False and audio-only models ignore frames.
    d = TurnDetector(tiny_mm, vad=LoudnessVAD(), params=params.replace(use_video=False))
    assert not d.has_video and d.push_frame(face_frames(1)[0]) is False
    d = TurnDetector(v32_onnx, vad=LoudnessVAD())
    assert not d.has_video and d.push_frame(face_frames(1)[0]) is False


def test_frame_validation(tiny_mm):
    d = TurnDetector(tiny_mm, vad=LoudnessVAD())
    frame = face_frames(1)[0]
    with pytest.raises(TypeError, match="uint8"):
        d.push_frame(frame.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        d.push_frame(frame[..., :2])
    assert d.push_frame(frame, 1.0)
    with pytest.raises(ValueError, match="time order"):
        d.push_frame(frame, 0.5)
    with pytest.raises(ValueError, match="finite"):
        d.push_frame(frame, float("inf"))
    # Large frames are stored downscaled; a new size replaces the stored frames.
    big = np.zeros((1080, 1920, 3), np.uint8)
    assert d.push_frame(big, 2.0)
    assert d.latest_frame().shape == (360, 640, 3)
    assert len(d._frames) == 1


@pytest.mark.slow
@needs_espeak
def test_soak_memory_stays_flat(tiny_mm):
    """10 minutes of speech with pauses (Silero VAD) and 25 fps video through one detector."""
    import resource

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    d = TurnDetector(tiny_mm, params=DetectorParams(threshold=0.0))  # every decision commits
    block = conversation(0.3, "I went to the market this morning", 0.5, "and bought apples", 2.0)
    frames = face_frames(50, 240, 320)
    n_blocks = -(-600 * SR // len(block))
    readings, commits, k, offset = [], 0, 0, 0
    for b in range(n_blocks):
        for i in range(0, len(block), 640):
            end_s = (offset + i + 640) / SR
            while k / 25 <= end_s:
                d.push_frame(frames[k % len(frames)], k / 25)
                k += 1
            for e in d.push_audio(block[i : i + 640]):
                commits += e.kind is EventKind.TURN_COMPLETE
        offset += len(block)
        if b % max(1, n_blocks // 10) == 0:
            readings.append(rss_mb())
    print(f"{offset / SR:.0f} s of audio, {k} frames, {commits} commits")
    print("RSS MB:", [round(r, 1) for r in readings])
    assert offset >= 600 * SR and commits == 2 * n_blocks
    assert max(readings[2:]) - readings[1] < 20, readings
