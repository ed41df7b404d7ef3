"""A synthetic audio-visual turn-taking dataset in the real format (SPEC 5), made offline.

Each recording is one synthetic speaker (voice pitch, syllable rate, skin tone, background, head
size) cut into a few segments. Every segment ends a turn (``endpoint_bool`` true) or pauses
inside one (false), and the ending is told by:

* the AUDIO only (``cue="audio"``): complete = falling pitch and decaying energy; incomplete =
  rising pitch and full energy up to an abrupt stop. The face is NEUTRAL (mouth closed, gaze
  away, no nod) whatever the label;
* the FACE only (``cue="video"``): complete = the mouth closes, the gaze returns to the camera
  and the head nods; incomplete = the mouth stays half open and the gaze stays away. The audio
  is NEUTRAL (level pitch, full energy, abrupt stop) whatever the label;
* BOTH (``cue="both"``): the two cues agree.

So an audio-only model is at chance on the face-only segments, and a model that uses the video
can beat it. Some segments with an audio cue have no video (``video_path`` null).

Files: ``audio/<id>.wav`` (16-bit PCM, 16 kHz, mono: written with :mod:`wave`), speech then a
short silence; ``video/<id>.mp4`` (H.264, 30 fps, ``frame_size`` square, already face-cropped),
the last ``video_seconds`` of the segment, ending with the audio. ``metadata.jsonl`` holds the
SPEC 5 fields plus ``source`` (the recording, used for grouped splits), ``cue`` and
``audio_pattern``; ``visual_label`` is what the face shows (true, false, or null for neutral).
"""

from __future__ import annotations

import dataclasses
import os
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.audio import SAMPLE_RATE
from smart_turn_mm.dataset import write_metadata
from smart_turn_mm.video import FRAME_SIZE

__all__ = [
    "VIDEO_FPS",
    "SyntheticSpec",
    "generate_dataset",
    "render_face_frames",
    "synth_speech",
]

VIDEO_FPS = 30
CUES = ("audio", "video", "both")
DATASET_NAME = "synthetic-av"
# Geometry of the drawn face, in units of a 112-pixel frame (scaled to ``frame_size``).
_REF = 112.0


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`generate_dataset` makes.

    Attributes:
        recordings: synthetic speakers / source recordings.
        segments_per_recording: segments cut from each.
        complete_fraction: share of segments that end the turn.
        cue_weights: relative frequency of the audio-only, face-only and both cues.
        no_video_fraction: share of audio-cued segments written without video.
        video_seconds: length of each clip (the model uses its last frames).
        frame_size: side of the (face-cropped, square) clips in pixels.
        seed: everything is determined by it.
        prefix: recording names are ``<prefix>NNN`` (use another for a separate test set).
    """

    recordings: int = 40
    segments_per_recording: int = 6
    complete_fraction: float = 0.4
    cue_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    no_video_fraction: float = 0.25
    video_seconds: float = 1.2
    frame_size: int = FRAME_SIZE
    seed: int = 0
    prefix: str = "rec"


# --------------------------------------------------------------------------- audio


def synth_speech(
    pattern: str,
    *,
    rng: np.random.Generator,
    f0: float = 140.0,
    syllable_hz: float = 4.5,
    speech_seconds: float = 2.0,
    silence_seconds: float = 0.2,
    noise: float = 0.005,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """A voiced, speech-like utterance ending with ``pattern``, then silence.

    Patterns (over the last 0.45-0.7 s of speech): ``"fall"`` pitch falls about 35% and the
    energy decays to nothing (a finished statement); ``"rise"`` pitch rises about 30% at full
    energy up to an abrupt stop (cut mid-phrase); ``"level"`` level pitch and an abrupt stop
    (uninformative).

    Returns:
        float32 ``(round((speech_seconds + silence_seconds) * sample_rate),)``, peak about 0.5.
    """
    if pattern not in ("fall", "rise", "level"):
        raise ValueError(f"pattern must be 'fall', 'rise' or 'level', got {pattern!r}")
    n = round(speech_seconds * sample_rate)
    t = np.arange(n) / sample_rate
    ending = rng.uniform(0.45, 0.7)
    u = np.clip((t - (speech_seconds - ending)) / ending, 0.0, 1.0)  # 0 -> 1 over the ending
    pitch = f0 * (1.0 + 0.06 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)))
    pitch *= 1.0 + 0.015 * np.sin(2 * np.pi * 5.5 * t)
    # Syllables: the last one peaks at the end of speech (so abrupt stops are truly abrupt).
    phase0 = np.pi / 2 - 2 * np.pi * syllable_hz * speech_seconds
    envelope = np.clip(np.sin(2 * np.pi * syllable_hz * t + phase0), 0.0, None) ** 0.7
    envelope = 0.25 + 0.75 * envelope
    if pattern == "fall":
        pitch *= 1.0 - 0.35 * u**1.3
        envelope *= (1.0 - u) ** 1.5
    elif pattern == "rise":
        pitch *= 1.0 + 0.3 * u**1.3
    fade = np.clip((speech_seconds - t) / 0.015, 0.0, 1.0)  # 15 ms ramp avoids a click
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    # Harmonics 1/k up to 3.5 kHz: z**k by repeated multiplication is cheaper than sin(k*phase).
    z = np.exp(1j * phase)
    zk = z.copy()
    voice = np.zeros(n)
    for k in range(1, int(3500 / pitch.max()) + 1):
        voice += (zk * np.exp(1j * rng.uniform(0, 2 * np.pi))).imag / k
        zk *= z
    speech = voice * envelope * fade
    speech *= 0.5 / max(np.abs(speech).max(), 1e-9)
    total = n + round(silence_seconds * sample_rate)
    out = np.zeros(total)
    out[:n] = speech
    out += noise * rng.standard_normal(total)
    return out.astype(np.float32)


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


# --------------------------------------------------------------------------- video


@dataclass(frozen=True)
class _Look:
    """One speaker's appearance (fixed over a recording)."""

    skin: np.ndarray  # (3,) RGB 0-255
    background: np.ndarray  # (3,)
    hair: np.ndarray  # (3,)
    scale: float  # head size relative to the reference
    offset: tuple[float, float]  # head centre offset (x, y) in reference pixels


def _random_look(rng: np.random.Generator) -> _Look:
    tone = rng.uniform(0.0, 1.0)
    skin = np.array([255, 224, 196]) * (1 - tone) + np.array([120, 80, 55]) * tone
    return _Look(
        skin=skin * rng.uniform(0.92, 1.05, size=3),
        background=rng.uniform(20, 235, size=3),
        hair=rng.uniform(10, 90, size=3),
        scale=rng.uniform(1.05, 1.2),
        offset=(rng.uniform(-5, 5), rng.uniform(-4, 4)),
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _face_timeline(
    pattern: str, times: np.ndarray, speech_end: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Per-frame mouth openness (0-1), gaze (x, y in eye units -1..1) and head offset (px).

    ``times`` are in seconds relative to the END of the segment (<= 0); speech stops at
    ``speech_end`` (< 0).
    """
    talk_hz = rng.uniform(3.5, 5.5)
    talking = 0.5 + 0.45 * np.sin(2 * np.pi * talk_hz * times + rng.uniform(0, 2 * np.pi))
    side = rng.choice([-1.0, 1.0])
    away = np.full_like(times, side * rng.uniform(0.6, 0.9))
    gaze_y = np.full_like(times, rng.uniform(-0.35, 0.1))
    sway = 1.5 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * times + rng.uniform(0, 2 * np.pi))
    nod = np.zeros_like(times)
    speaking = times < speech_end
    if pattern == "complete":
        close = _smoothstep((times - speech_end) / 0.12)
        mouth = np.where(speaking, talking, talking * (1 - close))
        back = _smoothstep((times - rng.uniform(-0.6, -0.45)) / 0.25)  # gaze returns
        gaze_x = away * (1 - back)
        gaze_y = gaze_y * (1 - back)
        start, length = rng.uniform(-0.5, -0.4), rng.uniform(0.35, 0.42)
        inside = (times >= start) & (times <= start + length)
        nod = np.where(inside, rng.uniform(6, 9) * np.sin(np.pi * (times - start) / length), 0.0)
    elif pattern == "incomplete":
        held = rng.uniform(0.65, 1.0)
        mouth = np.where(speaking, talking, held)
        gaze_x = away
    elif pattern == "neutral":
        close = _smoothstep((times - speech_end) / 0.12)
        mouth = np.where(speaking, talking, talking * (1 - close))
        gaze_x = away
    else:
        raise ValueError(f"face pattern must be complete, incomplete or neutral, got {pattern!r}")
    return {"mouth": mouth, "gaze_x": gaze_x, "gaze_y": gaze_y, "dx": sway, "dy": nod}


def render_face_frames(
    look: _Look, timeline: dict[str, np.ndarray], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw the face: uint8 (T, size, size, 3) RGB frames.

    A shaded skin-coloured ellipse with hair, two eyes and a mouth. Looking away turns the head
    (eyes, brows and mouth shift sideways) and moves the pupils further; the mouth's height
    follows the openness; the whole head moves with ``dx``/``dy`` (the nod).
    """
    k = size / _REF
    coords = np.arange(size, dtype=np.float32) + 0.5
    frames = np.empty((len(timeline["mouth"]), size, size, 3), np.uint8)
    shade = np.linspace(1.06, 0.9, size, dtype=np.float32)[:, None, None]  # light from above
    noise = rng.standard_normal(frames.shape, dtype=np.float32)
    noise *= 2.5
    white, pupil = np.array([245.0, 245.0, 240.0]), np.array([30.0, 25.0, 20.0])
    lips = np.array([110.0, 25.0, 35.0])
    for i in range(len(frames)):
        cx = (_REF / 2 + look.offset[0] + timeline["dx"][i]) * k
        cy = (_REF / 2 + 4 + look.offset[1] + timeline["dy"][i]) * k
        s = look.scale * k
        turn = timeline["gaze_x"][i] * 5.0 * s  # head yaw: the features slide sideways
        img = np.empty((size, size, 3), np.float32)
        img[:] = look.background
        _ellipse(img, coords, cx, cy - 8 * s, 33 * s, 38 * s, look.hair)
        _ellipse(img, coords, cx, cy, 29 * s, 38 * s, look.skin, shaded=True)
        for side in (-1, 1):
            ex, ey = cx + turn + side * 12 * s, cy - 8 * s
            _ellipse(img, coords, ex, ey, 8 * s, 5 * s, white)
            px = ex + timeline["gaze_x"][i] * 4.5 * s
            py = ey + timeline["gaze_y"][i] * 2.0 * s
            _ellipse(img, coords, px, py, 3.5 * s, 3.5 * s, pupil)
            _ellipse(img, coords, ex, ey - 8 * s, 7 * s, 1.4 * s, look.hair)  # eyebrow
        mouth_h = max(1.0, 10.0 * timeline["mouth"][i]) * s
        _ellipse(img, coords, cx + turn, cy + 18 * s, 12 * s, mouth_h, lips)
        img *= shade
        img += noise[i]
        np.clip(img, 0, 255, out=img)
        frames[i] = img
    return frames


def _ellipse(
    img: np.ndarray,
    coords: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    color: np.ndarray,
    shaded: bool = False,
) -> None:
    """Fill an axis-aligned ellipse (centre cx, cy; half-axes a, b) in place; ``shaded``
    darkens it towards its rim (a rounded look)."""
    size = img.shape[0]
    x0, x1 = max(int(cx - a), 0), min(int(cx + a) + 2, size)
    y0, y1 = max(int(cy - b), 0), min(int(cy + b) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return
    r = ((coords[x0:x1][None, :] - cx) / a) ** 2 + ((coords[y0:y1][:, None] - cy) / b) ** 2
    inside = r <= 1.0
    region = img[y0:y1, x0:x1]
    if shaded:
        region[inside] = color * (1.0 - 0.18 * r[inside, None])
    else:
        region[inside] = color


def _write_mp4(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------- dataset


def _segment_plan(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[bool, str, bool]:
    """(label, cue, has_video) of one segment."""
    label = bool(rng.random() < spec.complete_fraction)
    weights = np.asarray(spec.cue_weights, dtype=np.float64)
    cue = CUES[int(rng.choice(3, p=weights / weights.sum()))]
    has_video = cue == "video" or rng.random() >= spec.no_video_fraction
    return label, cue, has_video


def _recording_rows(root: Path, spec: SyntheticSpec, index: int) -> list[dict[str, Any]]:
    """Write one recording's segments; returns their metadata rows. Seeded by
    (spec.seed, index), so the result does not depend on how recordings are spread on workers."""
    rng = np.random.default_rng([spec.seed, index])
    n_frames = max(1, round(spec.video_seconds * VIDEO_FPS))
    times = (np.arange(n_frames) - (n_frames - 1)) / VIDEO_FPS  # seconds before the end
    source = f"{spec.prefix}{index:03d}"
    voice = {
        "f0": rng.uniform(95, 230),
        "syllable_hz": rng.uniform(3.5, 5.5),
        "noise": rng.uniform(0.002, 0.012),
    }
    look = _random_look(rng)
    rows = []
    for j in range(spec.segments_per_recording):
        seg_id = f"{source}_{j:02d}"
        label, cue, has_video = _segment_plan(spec, rng)
        audio_pattern = ("fall" if label else "rise") if cue != "video" else "level"
        face = ("complete" if label else "incomplete") if cue != "audio" else "neutral"
        silence = rng.uniform(0.15, 0.3)
        audio = synth_speech(
            audio_pattern,
            rng=rng,
            speech_seconds=rng.uniform(1.5, 3.0),
            silence_seconds=silence,
            **voice,
        )
        _write_wav(root / "audio" / f"{seg_id}.wav", audio)
        video_path = None
        if has_video:
            timeline = _face_timeline(face, times, -silence, rng)
            frames = render_face_frames(look, timeline, spec.frame_size, rng)
            video_path = f"video/{seg_id}.mp4"
            _write_mp4(root / video_path, frames)
        rows.append(
            {
                "file_name": f"audio/{seg_id}.wav",
                "id": seg_id,
                "language": "en",
                "endpoint_bool": label,
                "midfiller": False,
                "endfiller": False,
                "synthetic": True,
                "spoken_text": "",
                "dataset": DATASET_NAME,
                "video_path": video_path,
                "visual_label": None if face == "neutral" or not has_video else label,
                "source": source,
                "cue": cue,
                "audio_pattern": audio_pattern,
            }
        )
    return rows


def generate_dataset(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec | None = None,
    *,
    workers: int | None = None,
    **overrides: Any,
) -> Path:
    """Write a synthetic audio-visual dataset folder (SPEC 5 format) and return its path.

    ``spec`` fields can also be given as keyword arguments, e.g.
    ``generate_dataset(path, recordings=10, seed=1)``. ``workers`` processes write recordings in
    parallel (default: the CPU count, at most 8); the files do not depend on it.
    """
    spec = spec or SyntheticSpec()
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    if spec.recordings < 1 or spec.segments_per_recording < 1:
        raise ValueError("recordings and segments_per_recording must be >= 1")
    root = Path(out_dir)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "video").mkdir(parents=True, exist_ok=True)
    workers = min(workers or min(os.cpu_count() or 1, 8), spec.recordings)
    if workers <= 1:
        per_recording = [_recording_rows(root, spec, r) for r in range(spec.recordings)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_recording_rows, root, spec, r) for r in range(spec.recordings)]
            per_recording = [job.result() for job in jobs]
    write_metadata(root, [row for rows in per_recording for row in rows])
    return root
