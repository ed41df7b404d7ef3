"""Replay a recording through :class:`~smart_turn_mm.realtime.TurnDetector` and print the
event timeline: ``smart-turn-mm replay audio.wav [video.mp4]``.

Audio is streamed in chunks (20 ms by default) and video frames at their timestamps, either in
real time (``--speed 1``, the default: the detector never blocks and late decisions are
delivered as soon as the model finishes, as in a live call) or as fast as possible
(``--fast``: the detector waits for each due decision, so the timeline is the same on any
machine; the delays then measure the model's time, not a live call's).

numpy, onnxruntime and PyAV only.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smart_turn_mm.audio import SAMPLE_RATE, load_audio
from smart_turn_mm.media import open_media, video_streams
from smart_turn_mm.realtime import (
    DetectorParams,
    EventKind,
    RedemptionPreset,
    Sensitivity,
    TurnDetector,
    TurnEvent,
)

__all__ = ["ReplayResult", "add_arguments", "iter_video_frames", "replay", "run", "summarize"]


def iter_video_frames(path: str | os.PathLike[str]) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, uint8 RGB frame) for every frame of the first video stream."""
    from smart_turn_mm.face import sws_options

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    with open_media(path, "video") as container:
        streams = video_streams(container)
        if not streams:
            raise ValueError(f"{path} has no video stream")
        stream = streams[0]
        stream.thread_type = "AUTO"
        options = sws_options()
        last = -1.0
        for index, frame in enumerate(container.decode(stream)):
            rate = stream.average_rate or 30
            t = float(frame.time) if frame.time is not None else index / float(rate)
            t = max(t, last, 0.0)  # never backwards
            last = t
            yield t, frame.to_ndarray(format="rgb24", **options)


@dataclass
class ReplayResult:
    """Events of a replay, with the audio length and the wall time it took."""

    events: list[TurnEvent]
    audio_s: float
    wall_s: float
    frames: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, np.float64), q))


def summarize(events: list[TurnEvent]) -> dict[str, Any]:
    """Counts, and median / P90 of the decision delay and model time, of a timeline."""
    decisions = [
        e
        for e in events
        if e.kind in (EventKind.DECISION, EventKind.TURN_COMPLETE) and e.model_ms is not None
    ]
    delays = [
        e.delay_after_redemption_ms for e in decisions if e.delay_after_redemption_ms is not None
    ]
    model = [e.model_ms for e in decisions if e.model_ms is not None]
    commits = [e for e in events if e.kind is EventKind.TURN_COMPLETE]
    return {
        "turns_started": sum(
            1 for e in events if e.kind is EventKind.SPEECH_START and not e.resumed
        ),
        "turns_completed": len(commits),
        "commits_by_model": sum(1 for e in commits if e.reason == "model"),
        "commits_by_max_silence": sum(1 for e in commits if e.reason == "max_silence"),
        "decisions": len(decisions),
        "cancelled": sum(1 for e in events if e.kind is EventKind.CANCELLED),
        "decisions_with_video": sum(1 for e in decisions if e.av_probability is not None),
        "delay_after_redemption_ms": {
            "median": _percentile(delays, 50),
            "p90": _percentile(delays, 90),
            "max": max(delays) if delays else None,
        },
        "model_ms": {"median": _percentile(model, 50), "p90": _percentile(model, 90)},
    }


def replay(
    audio: str | os.PathLike[str] | np.ndarray,
    video: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    params: DetectorParams | None = None,
    speed: float = 0.0,
    chunk_ms: float = 20.0,
    detector: TurnDetector | None = None,
    on_event: Callable[[TurnEvent], None] | None = None,
) -> ReplayResult:
    """Stream a recording through a detector.

    Args:
        audio: a file, or float32 mono audio at 16 kHz.
        video: an optional video file; its frame times share the audio's clock (0 = start).
        model, params: for the detector made here (ignored when ``detector`` is given).
        speed: 1.0 = real time, 2.0 = twice as fast, 0 = as fast as possible (deterministic).
        chunk_ms: audio chunk length.
        on_event: called with each event as it happens.
    """
    if speed < 0 or not np.isfinite(speed):
        raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {speed}")
    if not 1.0 <= chunk_ms <= 1000.0:
        raise ValueError(f"chunk_ms must be in [1, 1000], got {chunk_ms}")
    if isinstance(audio, np.ndarray):
        samples = np.asarray(audio, np.float32)
        if samples.ndim != 1:
            raise ValueError(f"audio must be mono (n,) at 16 kHz, got shape {samples.shape}")
    else:
        samples = load_audio(audio)
    if video is not None and not os.path.isfile(video):
        raise FileNotFoundError(f"video file not found: {video}")
    ready = threading.Event()
    own = detector is None
    if detector is None:
        detector = TurnDetector(model, params=params, wait_for_model=speed == 0, on_ready=ready.set)
    elif speed > 0:
        detector.on_ready = ready.set
        detector.wait_for_model = False
    frames = iter_video_frames(video) if video is not None else iter(())
    next_frame = next(frames, None)
    chunk = max(1, round(chunk_ms * SAMPLE_RATE / 1000))
    events: list[TurnEvent] = []
    n_frames = 0

    def emit(new: list[TurnEvent]) -> None:
        for event in new:
            events.append(event)
            if on_event is not None:
                on_event(event)

    t0 = time.perf_counter()
    try:
        for start in range(0, samples.shape[0], chunk):
            end = min(start + chunk, samples.shape[0])
            end_s = end / SAMPLE_RATE
            if speed > 0:  # wait until the chunk "has been recorded", delivering decisions
                while (left := t0 + end_s / speed - time.perf_counter()) > 0:
                    if ready.wait(left):
                        ready.clear()
                        emit(detector.poll())
            while next_frame is not None and next_frame[0] <= end_s:
                detector.push_frame(next_frame[1], next_frame[0])
                n_frames += 1
                next_frame = next(frames, None)
            emit(detector.push_audio(samples[start:end], timestamp_s=start / SAMPLE_RATE))
        if speed > 0:  # let a decision in flight land
            deadline = time.perf_counter() + 10.0
            while detector.decision_pending and time.perf_counter() < deadline:
                if ready.wait(0.05):
                    ready.clear()
                    emit(detector.poll())
    finally:
        if own:
            detector.close()
    wall = time.perf_counter() - t0
    return ReplayResult(events, samples.shape[0] / SAMPLE_RATE, wall, n_frames, summarize(events))


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm replay``."""
    parser.add_argument("audio", help="audio file (or a video file with an audio track)")
    parser.add_argument("video", nargs="?", help="video file (optional; face-cropped)")
    parser.add_argument("-m", "--model", help="ONNX model file, export directory or Hub id")
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 = real time (default), 2 = twice as fast; --fast = as fast as possible",
    )
    parser.add_argument(
        "--fast", action="store_true", help="as fast as possible (deterministic timeline)"
    )
    parser.add_argument(
        "--redemption",
        choices=[p.name.lower() for p in RedemptionPreset],
        default="balanced",
        help="silence before a decision: fast 200 ms, balanced 300 ms, relaxed 500 ms",
    )
    parser.add_argument("--redemption-ms", type=float, help="overrides --redemption")
    parser.add_argument(
        "--sensitivity",
        choices=[s.name.lower() for s in Sensitivity],
        default="normal",
        help="threshold: aggressive 0.3, normal 0.5, conservative 0.7",
    )
    parser.add_argument("--threshold", type=float, help="overrides --sensitivity")
    parser.add_argument("--max-silence-ms", type=float, default=3000.0)
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="audio chunk length")
    parser.add_argument("--no-video", action="store_true", help="ignore the video")
    parser.add_argument("--json", action="store_true", help="print events and summary as JSON")


def _params_from_args(args: argparse.Namespace) -> DetectorParams:
    params = DetectorParams.preset(
        args.redemption, args.sensitivity, max_silence_ms=args.max_silence_ms
    )
    if args.redemption_ms is not None:
        params = params.replace(redemption_ms=args.redemption_ms)
    if args.threshold is not None:
        params = params.replace(threshold=args.threshold)
    if args.no_video:
        params = params.replace(use_video=False)
    return params


def run(args: argparse.Namespace) -> int:
    from smart_turn_mm.inference import load_model

    params = _params_from_args(args)
    model = load_model(args.model)
    speed = 0.0 if args.fast else args.speed
    if not args.json:
        kind = "multimodal" if model.has_video else "audio-only"
        pace = "as fast as possible" if speed == 0 else f"{speed:g}x real time"
        print(f"model:  {model.path.name} ({kind})")
        print(
            f"params: redemption {params.redemption_ms:.0f} ms, threshold {params.threshold}, "
            f"max silence {params.max_silence_ms:.0f} ms; {pace}"
        )
    on_event = None if args.json else print
    video = None if args.no_video else args.video
    result = replay(
        args.audio,
        video,
        model=model,
        params=params,
        speed=speed,
        chunk_ms=args.chunk_ms,
        on_event=on_event,
    )
    if args.json:
        out = {
            "model": str(model.path),
            "params": params.to_dict(),
            "audio_s": result.audio_s,
            "wall_s": result.wall_s,
            "frames": result.frames,
            "events": [e.to_dict() for e in result.events],
            "summary": result.summary,
        }
        print(json.dumps(out, indent=2))
        return 0
    s = result.summary
    delay = s["delay_after_redemption_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    print(
        f"\n{result.audio_s:.2f} s of audio in {result.wall_s:.2f} s"
        + (f", {result.frames} video frames" if result.frames else "")
    )
    print(
        f"turns: {s['turns_completed']} committed ({s['commits_by_model']} by the model, "
        f"{s['commits_by_max_silence']} at max silence); decisions: {s['decisions']}, "
        f"cancelled: {s['cancelled']}"
    )
    print(
        f"delay after redemption: median {ms(delay['median'])}, P90 {ms(delay['p90'])}; "
        f"model: median {ms(s['model_ms']['median'])}, P90 {ms(s['model_ms']['p90'])}"
    )
    return 0
