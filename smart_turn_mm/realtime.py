"""Real-time turn detection: Silero VAD, a grace timer and the Smart Turn model.

Silence alone ends turns too early ("I think we should... [pause]"). :class:`TurnDetector`
commits a turn only when the user has been silent for the *redemption time* AND the model
says the turn is complete::

    speech ──> buffer the turn (pre-roll + speech, the last 8 s kept)
    silence onset ──> speech_end; start the model on a worker thread (latency hiding)
    silence < redemption time ──> keep buffering (new speech cancels the pending decision)
    silence = redemption time ──> the decision: probability > threshold -> turn_complete
                                  otherwise keep waiting, re-check every recheck_interval_ms
    silence = max_silence_ms ──> turn_complete anyway (reason "max_silence")

Time is the audio sample clock: every 512-sample VAD chunk (32 ms at 16 kHz) advances it, so
replaying a recording faster than real time gives the same events as live audio (the
detector waits for a decision that is due but not yet computed; with
``wait_for_model=False`` it never blocks and :meth:`TurnDetector.poll` delivers late
decisions instead).

Latency hiding: the model starts at silence onset, on the audio of the turn so far followed by
zeros up to the end of the redemption time (the silence the VAD must still confirm before the
decision is used), so the decision is usually ready when the redemption time runs out. Each
decision reports ``model_ms`` (features + face crop + ONNX Runtime) and
``delay_after_redemption_ms``: how long after the end of the redemption time (or of the
re-check interval) the decision was taken.

Video: RGB frames pushed with timestamps on the same clock are kept (the last ``2 x T``,
downscaled to at most :data:`MAX_FRAME_SIDE` pixels). Each decision takes the last T frames
up to the end of its audio and crops them with the one face crop of the project
(:func:`smart_turn_mm.video.prepare_video`: :func:`~smart_turn_mm.face.clip_face_box` +
:func:`~smart_turn_mm.face.crop_frames`), on the worker thread, so the crop is hidden behind
the redemption time like the model (measured: about 35 ms for 32 frames of 640 x 480 on a
2-core machine, against a 200 ms minimum redemption time). No frames, frames too old, or no
face: the zero video embedding (SPEC 2). With a split model the audio embedding is computed
once and the head run twice, so every decision reports both the audio-only and the
audio+video probabilities.

numpy, onnxruntime and PyAV only.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from smart_turn_mm.audio import (
    N_SAMPLES,
    SAMPLE_RATE,
    _check_sample_rate,
    _log_mel,
    last_window,
    to_mono_16k,
)
from smart_turn_mm.face import FaceDetector, crop_frames
from smart_turn_mm.vad import CHUNK_SAMPLES, SileroVAD, stop_threshold

__all__ = [
    "MAX_FRAME_SIDE",
    "DetectorParams",
    "EventKind",
    "RedemptionPreset",
    "Sensitivity",
    "TurnDetector",
    "TurnEvent",
    "TurnScores",
    "VoiceActivity",
    "downscale_frame",
    "score_turn",
]

log = logging.getLogger(__name__)

# Frames are stored downscaled so that their longer side is at most this many pixels: the
# face crop is resized to 112 px anyway, and a face filling a third of a 640 px frame still
# gives a crop larger than that. Bounds memory at about 2 x 32 x 0.9 MB per detector.
MAX_FRAME_SIDE = 640
# Audio timestamps closer than this to the stream clock count as contiguous (jitter).
TIMESTAMP_TOLERANCE_S = 0.1
# A timestamp further ahead than this is refused instead of filled with silence.
MAX_GAP_S = 30.0


class RedemptionPreset(float, enum.Enum):
    """How long the user must be silent before a decision, in milliseconds."""

    FAST = 200.0
    BALANCED = 300.0
    RELAXED = 500.0


class Sensitivity(float, enum.Enum):
    """The probability the model must exceed to commit a turn (lower commits sooner)."""

    AGGRESSIVE = 0.3
    NORMAL = 0.5
    CONSERVATIVE = 0.7


def _enum_member(enum_type: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        try:
            return enum_type[value.upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in enum_type)
            raise ValueError(f"unknown {enum_type.__name__} {value!r}; one of: {names}") from None
    raise TypeError(f"expected a {enum_type.__name__} or its name, got {type(value).__name__}")


@dataclass(frozen=True)
class DetectorParams:
    """Settings of :class:`TurnDetector`; units are in the names.

    Attributes:
        redemption_ms: silence before the first decision (presets: :class:`RedemptionPreset`).
        threshold: commit when the model's probability is above this (:class:`Sensitivity`).
        max_silence_ms: commit anyway after this much silence.
        recheck_interval_ms: after an "incomplete" decision, decide again this often while
            the silence lasts.
        pre_roll_ms: audio kept before the detected start of speech.
        vad_threshold: Silero speech probability that counts as speech; silence is below
            ``vad_threshold - 0.15`` (hysteresis).
        min_speech_ms: speech this long starts (or resumes) a turn (shorter blips are noise).
        min_silence_ms: silence this long is a pause (shorter dips stay inside a word); the
            pause is timed from its first silent chunk.
        max_frame_age_ms: video frames older than this at a decision are not used.
        use_video: use pushed frames when the model has a video branch.
        require_face: no face found in the clip -> the zero video embedding (SPEC 2);
            ``False`` feeds the centre crop instead.
        fill_silence: the latency-hiding snapshot is padded with zeros up to the decision's
            due time (``False``: the model sees the audio up to its start only).
    """

    redemption_ms: float = RedemptionPreset.BALANCED.value
    threshold: float = Sensitivity.NORMAL.value
    max_silence_ms: float = 3000.0
    recheck_interval_ms: float = 300.0
    pre_roll_ms: float = 500.0
    vad_threshold: float = 0.5
    min_speech_ms: float = 96.0
    min_silence_ms: float = 64.0
    max_frame_age_ms: float = 500.0
    use_video: bool = True
    require_face: bool = True
    fill_silence: bool = True

    def __post_init__(self) -> None:
        for name in (
            "redemption_ms",
            "max_silence_ms",
            "recheck_interval_ms",
            "pre_roll_ms",
            "min_speech_ms",
            "min_silence_ms",
            "max_frame_age_ms",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.recheck_interval_ms < 32:
            raise ValueError(f"recheck_interval_ms must be >= 32, got {self.recheck_interval_ms}")
        if self.max_silence_ms < self.redemption_ms:
            raise ValueError(
                f"max_silence_ms ({self.max_silence_ms}) must be >= redemption_ms "
                f"({self.redemption_ms})"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.vad_threshold < 1.0:
            raise ValueError(f"vad_threshold must be in (0, 1), got {self.vad_threshold}")

    @classmethod
    def preset(
        cls,
        redemption: RedemptionPreset | str = RedemptionPreset.BALANCED,
        sensitivity: Sensitivity | str = Sensitivity.NORMAL,
        **overrides: Any,
    ) -> DetectorParams:
        """Params from named presets, e.g. ``DetectorParams.preset("fast", "aggressive")``."""
        red = _enum_member(RedemptionPreset, redemption)
        sens = _enum_member(Sensitivity, sensitivity)
        return cls(**{"redemption_ms": red.value, "threshold": sens.value, **overrides})

    def replace(self, **changes: Any) -> DetectorParams:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EventKind(str, enum.Enum):
    """What a :class:`TurnEvent` reports."""

    SPEECH_START = "speech_start"  # a turn starts, or speech resumes during a pause
    SPEECH_END = "speech_end"  # silence onset: a pause starts
    DECISION = "decision"  # the model says "incomplete": keep waiting
    TURN_COMPLETE = "turn_complete"  # the turn is committed
    CANCELLED = "cancelled"  # speech resumed before a pending decision


@dataclass(frozen=True)
class TurnEvent:
    """One event of the detector's timeline.

    Attributes:
        kind: see :class:`EventKind`.
        time_s: stream time of the event (the audio clock, in the timestamps' time base).
        turn_id: 1 for the first turn, then counting.
        resumed: for ``speech_start``: speech resumed inside a turn (not a new turn).
        silence_ms: silence so far (decisions, commits, cancellations).
        probability: the deciding probability (audio+video when video was used).
        audio_probability: the model's probability without video (zero video embedding).
        av_probability: with the video clip (``None`` when no usable video).
        face_found: whether the clip had a face (``None`` without frames or a video model).
        num_frames: real frames in the clip (0 without video).
        model_ms: wall time of the decision's computation (features, crop, ONNX Runtime).
        delay_after_redemption_ms: wall time from the moment the decision was due (end of
            the redemption time, or of a re-check interval) to the decision.
        reason: for ``turn_complete``: ``"model"`` or ``"max_silence"``.
        timings_ms: the parts of ``model_ms``.
    """

    kind: EventKind
    time_s: float
    turn_id: int
    resumed: bool = False
    silence_ms: float | None = None
    probability: float | None = None
    audio_probability: float | None = None
    av_probability: float | None = None
    face_found: bool | None = None
    num_frames: int = 0
    model_ms: float | None = None
    delay_after_redemption_ms: float | None = None
    reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``kind`` as its string)."""
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        return out

    def __str__(self) -> str:
        parts = [f"{self.time_s:8.3f}s  turn {self.turn_id}  {self.kind.value}"]
        if self.resumed:
            parts.append("(resumed)")
        if self.silence_ms is not None:
            parts.append(f"silence {self.silence_ms:.0f} ms")
        if self.probability is not None:
            parts.append(f"p={self.probability:.3f}")
        if self.av_probability is not None:
            parts.append(
                f"(audio {self.audio_probability:.3f}, audio+video {self.av_probability:.3f})"
            )
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.model_ms is not None:
            parts.append(f"model {self.model_ms:.1f} ms")
        if self.delay_after_redemption_ms is not None:
            parts.append(f"delay {self.delay_after_redemption_ms:.1f} ms")
        return "  ".join(parts)


class VoiceActivity(Protocol):
    """What the detector needs from a VAD (:class:`~smart_turn_mm.vad.SileroVAD` is one)."""

    def reset(self) -> None: ...

    def __call__(self, chunk: np.ndarray) -> float: ...


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class TurnScores:
    """The model's view of one turn (see :func:`score_turn`).

    ``face_crop`` is the crop of the clip's last frame, uint8 (S, S, 3), for display.
    """

    audio_probability: float
    av_probability: float | None = None
    face_found: bool | None = None
    num_frames: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    face_crop: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def probability(self) -> float:
        """The deciding probability: audio+video when video was used, else audio-only."""
        return self.audio_probability if self.av_probability is None else self.av_probability


def score_turn(
    model: Any,
    audio16k: np.ndarray,
    frames: Sequence[np.ndarray] | None = None,
    *,
    face_crop: bool = True,
    require_face: bool = True,
    detector: FaceDetector | None = None,
) -> TurnScores:
    """Run the model on a turn: audio-only and, with frames and a video model, audio+video.

    Args:
        model: a :class:`~smart_turn_mm.inference.TurnModel` (or an object with its
            ``predict``/``has_video``/``num_frames``/``frame_size`` and, for split models,
            ``split``/``audio_embedding``/``video_embedding``/``head``).
        audio16k: float32 mono 16 kHz audio; the last 8 s are used.
        frames: uint8 (H, W, 3) RGB frames, oldest first; the last ``model.num_frames``
            are used (fewer are padded by the last one).
        face_crop: crop to the face (``False``: centre square, for pre-cropped frames).
        require_face: no face -> the zero video embedding (``False``: the centre crop).

    Returns:
        :class:`TurnScores` with ``timings_ms`` keys ``features``, ``video``, ``model``.
    """
    from smart_turn_mm.video import prepare_video

    t0 = time.perf_counter()
    features = _log_mel(last_window(np.asarray(audio16k, np.float32)))[None]
    t1 = time.perf_counter()
    pixels, found, n_frames, crop = None, None, 0, None
    if frames and getattr(model, "has_video", False):
        size = model.frame_size
        clip = prepare_video(
            list(frames)[-model.num_frames :],
            face_crop=face_crop,
            num_frames=model.num_frames,
            size=size,
            detector=detector,
        )
        found, n_frames = clip.face_found, clip.num_source_frames
        crop = crop_frames([frames[-1]], clip.box, size)[0]
        if found or not require_face:
            pixels = clip.pixel_values[None]
    t2 = time.perf_counter()
    av = None
    if not getattr(model, "has_video", False):
        audio_p = float(model.predict(features)[0])
    elif getattr(model, "split", False):
        embedding = model.audio_embedding(features)
        audio_p = float(model.head(embedding, None)[0])
        if pixels is not None:
            av = float(model.head(embedding, model.video_embedding(pixels))[0])
    else:  # a combined graph without its split: two full runs
        audio_p = float(model.predict(features, None)[0])
        if pixels is not None:
            av = float(model.predict(features, pixels)[0])
    t3 = time.perf_counter()
    timings = {
        "features": (t1 - t0) * 1e3,
        "video": (t2 - t1) * 1e3,
        "model": (t3 - t2) * 1e3,
    }
    return TurnScores(audio_p, av, found, n_frames, timings, crop)


# --------------------------------------------------------------------------- buffers


class _AudioRing:
    """The last ``capacity`` samples of the stream, addressed by absolute sample index."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = np.zeros(capacity, np.float32)
        self.end = 0  # absolute index one past the newest sample

    def write(self, samples: np.ndarray) -> None:
        n = samples.shape[0]
        if n >= self.capacity:
            samples, n = samples[-self.capacity :], self.capacity
            self.end += samples.shape[0] - n
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos : pos + first] = samples[:first]
        self._buf[: n - first] = samples[first:]
        self.end += n

    def read(self, start: int) -> np.ndarray:
        """A copy of samples [start, end) (clamped to what is kept)."""
        start = max(start, self.end - self.capacity, 0)
        n = self.end - start
        pos = start % self.capacity
        if pos + n <= self.capacity:
            return self._buf[pos : pos + n].copy()
        return np.concatenate([self._buf[pos:], self._buf[: n - (self.capacity - pos)]])


class _StreamResampler:
    """Streaming libswresample (PyAV) to 16 kHz mono float32, state kept between chunks."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, mono: np.ndarray) -> np.ndarray:
        import av

        frame = av.AudioFrame.from_ndarray(mono[None], format="flt", layout="mono")
        frame.sample_rate = self.rate
        out = [f.to_ndarray()[0] for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def downscale_frame(rgb: np.ndarray) -> np.ndarray:
    """A contiguous copy of the frame with its longer side at most :data:`MAX_FRAME_SIDE`."""
    height, width = rgb.shape[:2]
    if max(height, width) <= MAX_FRAME_SIDE:
        return np.array(rgb, dtype=np.uint8, order="C", copy=True)
    import av

    from smart_turn_mm.face import sws_options

    k = MAX_FRAME_SIDE / max(height, width)
    h, w = max(1, round(height * k)), max(1, round(width * k))
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(width=w, height=h, interpolation="AREA", **sws_options()).to_ndarray()


@dataclass
class _Job:
    future: Future
    turn_id: int
    due: int  # absolute sample at which the decision applies
    crossed_wall: float | None = None  # perf_counter when the stream reached ``due``


# --------------------------------------------------------------------------- the detector


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "predict") and hasattr(obj, "has_video")


class TurnDetector:
    """Streaming end-of-turn detection (see the module docstring for the flow).

    Args:
        model: a :class:`~smart_turn_mm.inference.TurnModel` (or a compatible object), a
            model path / directory / Hub id, or ``None`` (resolved as
            :func:`~smart_turn_mm.inference.load_model` does).
        params: :class:`DetectorParams` (default: Balanced, Normal).
        vad: a :class:`VoiceActivity` (default: a new :class:`~smart_turn_mm.vad.SileroVAD`).
        face_detector: for the face crop (default: the shared YuNet detector).
        wait_for_model: when a decision is due and the model has not finished, wait for it
            inside :meth:`push_audio` (deterministic: replay at any speed gives the same
            events). ``False``: never block; the decision comes from a later
            :meth:`push_audio` or :meth:`poll` (speech that resumes meanwhile cancels it).
        on_ready: called (from the worker thread) when a model run finishes; with
            ``wait_for_model=False``, call :meth:`poll` then.
        providers, threads: ONNX Runtime settings when the model is loaded here.

    Calls are serialised by a lock, so audio and frames may come from different threads; the
    model runs on the detector's own worker thread.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        params: DetectorParams | None = None,
        vad: VoiceActivity | None = None,
        face_detector: FaceDetector | None = None,
        wait_for_model: bool = True,
        on_ready: Callable[[], None] | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        if _is_model(model):
            self.model = model
        elif model is None or isinstance(model, (str, os.PathLike)):
            from smart_turn_mm.inference import load_model

            self.model = load_model(model, providers=providers, threads=threads)
        else:
            raise TypeError(
                f"model must be a TurnModel, a path, a Hub id or None, got {type(model).__name__}"
            )
        self._params = params or DetectorParams()
        if not isinstance(self._params, DetectorParams):
            raise TypeError(f"params must be DetectorParams, got {type(params).__name__}")
        self._vad = vad if vad is not None else SileroVAD()
        self._face_detector = face_detector
        self.wait_for_model = wait_for_model
        self.on_ready = on_ready
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-detector")
        self._finalizer = weakref.finalize(
            self, self._executor.shutdown, wait=False, cancel_futures=True
        )
        self._lock = threading.RLock()
        self.last_scores: TurnScores | None = None
        self.reset()

    # -- public state -------------------------------------------------------------------------

    @property
    def params(self) -> DetectorParams:
        return self._params

    @params.setter
    def params(self, value: DetectorParams) -> None:
        """Takes effect at once: timers of a pause in progress use the new values."""
        if not isinstance(value, DetectorParams):
            raise TypeError(f"params must be DetectorParams, got {type(value).__name__}")
        with self._lock:
            self._params = value

    @property
    def has_video(self) -> bool:
        """Whether pushed frames are used (the model has a video branch and use_video)."""
        return bool(getattr(self.model, "has_video", False)) and self._params.use_video

    @property
    def time_s(self) -> float:
        """The stream clock: time of the end of the audio processed so far."""
        return self._time(self._clock)

    @property
    def vad_probability(self) -> float:
        """Silero's speech probability for the latest 32 ms chunk."""
        return self._vad_prob

    @property
    def speaking(self) -> bool:
        return self._phase == "speech"

    @property
    def state(self) -> str:
        """``"idle"`` (no turn), ``"speech"`` or ``"pause"`` (silence inside a turn)."""
        return self._phase

    @property
    def turn_id(self) -> int:
        return self._turn_id

    @property
    def decision_pending(self) -> bool:
        """A model run for the current pause is under way or waiting to be delivered."""
        return self._job is not None

    def latest_frame(self) -> np.ndarray | None:
        """The newest stored frame (downscaled), or None."""
        return self._frames[-1][1] if self._frames else None

    # -- control --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream: clock, buffers, VAD state, pending decision, turn counter."""
        with self._lock:
            job = getattr(self, "_job", None)
            if job is not None:
                job.future.cancel()
            self._vad.reset()
            self._ring = _AudioRing(N_SAMPLES)
            self._pending = np.zeros(0, np.float32)
            self._clock = 0  # absolute 16 kHz samples processed by the VAD
            self._offset_s: float | None = None
            self._resampler: _StreamResampler | None = None
            self._phase = "idle"
            self._run = 0
            self._run_start = 0
            self._quiet_start: int | None = None
            self._turn_id = 0
            self._turn_start = 0
            self._pause_start = 0
            self._job: _Job | None = None
            self._turn_scores: TurnScores | None = None
            self._vad_prob = 0.0
            self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=self._frame_capacity())

    def close(self) -> None:
        """Stop the worker thread (pending model runs are dropped)."""
        with self._lock:
            if self._job is not None:
                self._job.future.cancel()
                self._job = None
        self._finalizer()

    def __enter__(self) -> TurnDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- input -------------------------------------------------------------------------------

    def push_audio(
        self,
        chunk: np.ndarray,
        sample_rate: int = SAMPLE_RATE,
        timestamp_s: float | None = None,
    ) -> list[TurnEvent]:
        """Feed audio of any length; returns the events it caused, in order.

        Args:
            chunk: PCM, float in [-1, 1] or int16/int32 (mono, or multichannel: see
                :func:`~smart_turn_mm.audio.to_mono_16k`).
            sample_rate: rate of ``chunk`` (resampled to 16 kHz with a streaming resampler).
            timestamp_s: stream time of the chunk's first sample (optional). The first one
                sets the clock's origin; later ones are checked: a gap is filled with
                silence (up to 30 s), audio more than 0.1 s behind the clock is refused.

        Raises:
            ValueError / TypeError: bad audio, or a timestamp out of order or far ahead.
        """
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this TurnDetector is closed")
            sample_rate = _check_sample_rate(sample_rate)
            arr = np.asarray(chunk)
            if arr.size == 0:
                return self._poll()
            mono = to_mono_16k(arr, SAMPLE_RATE)  # validation and down-mix only
            gap = self._check_timestamp(timestamp_s)
            if sample_rate != SAMPLE_RATE:
                if self._resampler is None or self._resampler.rate != sample_rate:
                    self._resampler = _StreamResampler(sample_rate)
                mono = self._resampler(mono)
            events: list[TurnEvent] = []
            if gap:
                events += self._feed(np.zeros(gap, np.float32))
            events += self._feed(mono)
            events += self._poll()
            return events

    def push_frame(self, rgb: np.ndarray, timestamp_s: float | None = None) -> bool:
        """Feed one RGB video frame; returns whether it was kept.

        Args:
            rgb: uint8 (H, W, 3) RGB.
            timestamp_s: stream time of the frame (default: the audio clock now). Frames must
                come in time order.

        Frames are ignored (False) when the model has no video branch or ``use_video`` is off.
        A change of frame size clears the stored frames.
        """
        from smart_turn_mm.face import _check_rgb

        _check_rgb(rgb, "frame")
        with self._lock:
            if not self.has_video:
                return False
            ts = self.time_s if timestamp_s is None else float(timestamp_s)
            if not math.isfinite(ts):
                raise ValueError(f"frame timestamp must be finite, got {timestamp_s!r}")
            if self._frames and ts < self._frames[-1][0]:
                raise ValueError(
                    f"frame at {ts:.3f} s is older than the previous frame "
                    f"({self._frames[-1][0]:.3f} s): frames must come in time order"
                )
            small = downscale_frame(rgb)
            if self._frames and self._frames[-1][1].shape != small.shape:
                log.info(
                    "frame size changed from %s to %s: stored frames dropped",
                    self._frames[-1][1].shape,
                    small.shape,
                )
                self._frames.clear()
            self._frames.append((ts, small))
            return True

    def poll(self) -> list[TurnEvent]:
        """Deliver a decision that was due and has finished since the last call (only needed
        with ``wait_for_model=False``)."""
        with self._lock:
            return self._poll()

    # -- internals ------------------------------------------------------------------------------

    def _frame_capacity(self) -> int:
        return 2 * int(getattr(self.model, "num_frames", None) or 32)

    def _time(self, sample: int) -> float:
        return (self._offset_s or 0.0) + sample / SAMPLE_RATE

    def _check_timestamp(self, timestamp_s: float | None) -> int:
        """Validate a chunk's timestamp against the stream clock; returns the samples of
        silence to insert before the chunk (a gap in the stream)."""
        if timestamp_s is None:
            return 0
        ts = float(timestamp_s)
        if not math.isfinite(ts):
            raise ValueError(f"timestamp_s must be finite, got {timestamp_s!r}")
        buffered = (self._clock + self._pending.shape[0]) / SAMPLE_RATE
        if self._offset_s is None:
            self._offset_s = ts - buffered
            return 0
        expected = self._offset_s + buffered
        ahead = ts - expected
        if ahead < -TIMESTAMP_TOLERANCE_S:
            raise ValueError(
                f"audio chunk at {ts:.3f} s is {-ahead * 1e3:.0f} ms behind the stream clock "
                f"({expected:.3f} s): out of order or duplicated"
            )
        if ahead > MAX_GAP_S:
            raise ValueError(
                f"audio chunk at {ts:.3f} s is {ahead:.1f} s ahead of the stream clock "
                f"({expected:.3f} s): more than {MAX_GAP_S:.0f} s missing"
            )
        return round(ahead * SAMPLE_RATE) if ahead > TIMESTAMP_TOLERANCE_S else 0

    def _feed(self, mono16k: np.ndarray) -> list[TurnEvent]:
        if self._pending.shape[0]:
            mono16k = np.concatenate([self._pending, mono16k])
        n_full = mono16k.shape[0] // CHUNK_SAMPLES * CHUNK_SAMPLES
        events: list[TurnEvent] = []
        for start in range(0, n_full, CHUNK_SAMPLES):
            events += self._step(mono16k[start : start + CHUNK_SAMPLES])
        self._pending = mono16k[n_full:].copy()
        return events

    def _step(self, chunk: np.ndarray) -> list[TurnEvent]:
        """One 32 ms chunk through the VAD and the state machine."""
        p = self._params
        start = self._clock
        self._ring.write(chunk)
        self._clock = end = start + CHUNK_SAMPLES
        prob = self._vad_prob = float(self._vad(chunk))
        per_ms = SAMPLE_RATE / 1000.0
        events: list[TurnEvent] = []
        if prob >= p.vad_threshold:
            if self._run == 0:
                self._run_start = start
            self._run += CHUNK_SAMPLES
        else:
            self._run = 0
        speech_confirmed = self._run > 0 and self._run >= p.min_speech_ms * per_ms

        if self._phase == "idle":
            if speech_confirmed:
                self._turn_id += 1
                self._turn_start = self._run_start - round(p.pre_roll_ms * per_ms)
                self._phase = "speech"
                self._quiet_start = None
                events.append(
                    TurnEvent(EventKind.SPEECH_START, self._time(self._run_start), self._turn_id)
                )
        elif self._phase == "speech":
            if prob < stop_threshold(p.vad_threshold):
                if self._quiet_start is None:
                    self._quiet_start = start
                if end - self._quiet_start >= max(p.min_silence_ms * per_ms, 1):
                    self._phase = "pause"
                    self._pause_start = self._quiet_start
                    self._quiet_start = None
                    events.append(
                        TurnEvent(
                            EventKind.SPEECH_END, self._time(self._pause_start), self._turn_id
                        )
                    )
                    due = self._pause_start + round(p.redemption_ms * per_ms)
                    self._launch(max(due, end))
            else:
                self._quiet_start = None
        elif self._phase == "pause" and speech_confirmed:
            self._quiet_start = None
            if self._job is not None:
                self._job.future.cancel()
                self._job = None
                events.append(
                    TurnEvent(
                        EventKind.CANCELLED,
                        self._time(self._run_start),
                        self._turn_id,
                        silence_ms=(self._run_start - self._pause_start) / per_ms,
                    )
                )
            self._phase = "speech"
            events.append(
                TurnEvent(
                    EventKind.SPEECH_START,
                    self._time(self._run_start),
                    self._turn_id,
                    resumed=True,
                )
            )
        if self._phase == "pause":
            events += self._timers()
        return events

    def _timers(self) -> list[TurnEvent]:
        """Deliver a due decision, re-check, or fall back to max silence (in a pause)."""
        p = self._params
        per_ms = SAMPLE_RATE / 1000.0
        now = self._clock
        events: list[TurnEvent] = []
        job = self._job
        if job is not None:
            if job.crossed_wall is None and now >= job.due:
                job.crossed_wall = time.perf_counter()
            if job.crossed_wall is not None and (job.future.done() or self.wait_for_model):
                events += self._decide(job)
        if self._phase == "pause" and now - self._pause_start >= p.max_silence_ms * per_ms:
            if self._job is not None:
                self._job.future.cancel()
                self._job = None
            last = self._turn_scores
            events.append(
                TurnEvent(
                    EventKind.TURN_COMPLETE,
                    self._time(now),
                    self._turn_id,
                    silence_ms=(now - self._pause_start) / per_ms,
                    probability=None if last is None else last.probability,
                    audio_probability=None if last is None else last.audio_probability,
                    av_probability=None if last is None else last.av_probability,
                    reason="max_silence",
                )
            )
            self._end_turn()
        return events

    def _decide(self, job: _Job) -> list[TurnEvent]:
        try:
            scores, model_ms = job.future.result()
        except Exception as e:  # the model failed: log it, the max-silence fallback remains
            log.error("turn %d: model run failed: %s: %s", job.turn_id, type(e).__name__, e)
            self._job = None
            return []
        assert job.crossed_wall is not None
        delay = max(0.0, (time.perf_counter() - job.crossed_wall) * 1e3)
        self._job = None
        self.last_scores = self._turn_scores = scores
        per_ms = SAMPLE_RATE / 1000.0
        now = self._clock
        complete = scores.probability > self._params.threshold
        event = TurnEvent(
            EventKind.TURN_COMPLETE if complete else EventKind.DECISION,
            self._time(now),
            job.turn_id,
            silence_ms=(now - self._pause_start) / per_ms,
            probability=scores.probability,
            audio_probability=scores.audio_probability,
            av_probability=scores.av_probability,
            face_found=scores.face_found,
            num_frames=scores.num_frames,
            model_ms=model_ms,
            delay_after_redemption_ms=delay,
            reason="model" if complete else None,
            timings_ms=dict(scores.timings_ms),
        )
        if complete:
            self._end_turn()
        else:
            due = max(job.due + round(self._params.recheck_interval_ms * per_ms), now)
            self._launch(due)
        return [event]

    def _end_turn(self) -> None:
        self._phase = "idle"
        self._job = None
        self._quiet_start = None
        self._turn_scores = None

    def _launch(self, due: int) -> None:
        """Start the model on the turn so far (padded with silence up to ``due``)."""
        p = self._params
        audio = self._ring.read(max(self._turn_start, self._clock - N_SAMPLES))
        if p.fill_silence and due > self._clock:
            audio = np.concatenate([audio, np.zeros(due - self._clock, np.float32)])
        frames = self._clip_frames() if self.has_video else []
        turn = self._turn_id
        detector = self._face_detector
        model = self.model

        def run() -> tuple[TurnScores, float]:
            t0 = time.perf_counter()
            scores = score_turn(
                model,
                audio,
                frames,
                require_face=p.require_face,
                detector=detector,
            )
            return scores, (time.perf_counter() - t0) * 1e3

        future = self._executor.submit(run)
        if self.on_ready is not None:
            callback = self.on_ready
            future.add_done_callback(lambda f: None if f.cancelled() else callback())
        self._job = _Job(future, turn, due)
        log.debug(
            "turn %d: model started at %.3f s, due %.3f s", turn, self.time_s, self._time(due)
        )

    def _clip_frames(self) -> list[np.ndarray]:
        """The last T frames up to the audio clock, or [] when none is recent enough."""
        now = self.time_s
        half_frame = 1.0 / 60.0
        usable = [f for t, f in self._frames if t <= now + half_frame]
        if not usable:
            return []
        newest = max(t for t, _ in self._frames if t <= now + half_frame)
        if now - newest > self._params.max_frame_age_ms / 1000.0:
            return []
        return usable[-int(getattr(self.model, "num_frames", 32)) :]

    def _poll(self) -> list[TurnEvent]:
        if self._phase != "pause" or self._job is None:
            return []
        job = self._job
        if job.crossed_wall is not None and job.future.done():
            return self._decide(job)
        return []
