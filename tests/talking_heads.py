"""Talking-head test clips made on the fly: a real face (the astronaut photo) drifting over a
moving background, with espeak-ng speech that pauses between phrases, muxed as H.264 + AAC."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from media import face_frames

from smart_turn_mm.audio import SAMPLE_RATE, load_audio
from smart_turn_mm.media import write_video

PHRASES = (
    "I went to the market this morning",
    "and then I bought some apples",
    "that is all I wanted to say",
)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


@functools.cache
def espeak(text: str, voice: str = "en") -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 mono at 16 kHz, leading/trailing silence trimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)
        audio = load_audio(wav)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    audio = audio[loud[0] : loud[-1] + 1] if len(loud) else audio
    audio.flags.writeable = False
    return audio


def speech_with_pauses(
    phrases: Sequence[str] = PHRASES,
    *,
    pause_s: float = 0.9,
    lead_s: float = 0.5,
    tail_s: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Phrases separated by ``pause_s`` of silence (plus a faint noise floor).

    Returns:
        (audio float32 at 16 kHz, [(start_s, end_s) of each phrase]).
    """
    rng = np.random.default_rng(seed)
    parts = [np.zeros(round(lead_s * SAMPLE_RATE), np.float32)]
    spans = []
    t = lead_s
    for i, text in enumerate(phrases):
        speech = espeak(text)
        spans.append((t, t + len(speech) / SAMPLE_RATE))
        t += len(speech) / SAMPLE_RATE
        parts.append(speech)
        gap = tail_s if i == len(phrases) - 1 else pause_s
        parts.append(np.zeros(round(gap * SAMPLE_RATE), np.float32))
        t += gap
    audio = np.concatenate(parts)
    audio += (0.001 * rng.standard_normal(len(audio))).astype(np.float32)
    return audio, spans


def write_talking_head(
    path: str | os.PathLike[str],
    phrases: Sequence[str] = PHRASES,
    *,
    fps: int = 25,
    height: int = 240,
    width: int = 320,
    face: bool = True,
    audio: bool = True,
    pause_s: float = 0.9,
    tail_s: float = 1.0,
    seed: int = 0,
    scale: float = 0.5,
) -> list[tuple[float, float]]:
    """Write a talking-head MP4 (H.264, AAC when ``audio``); returns the phrase spans (s).

    ``face=False`` draws noise where the face would be (no face to find); ``scale`` sizes
    the face (0.5: about 95 x 110 px).
    """
    samples, spans = speech_with_pauses(phrases, pause_s=pause_s, tail_s=tail_s, seed=seed)
    n = int(len(samples) / SAMPLE_RATE * fps)
    frames = face_frames(n, height, width, face=face, scale=scale)
    if not face:
        rng = np.random.default_rng(seed)
        for frame in frames:
            frame[40:200, 100:220] = rng.integers(0, 256, (160, 120, 3), dtype=np.uint8)
    write_video(path, frames, fps, audio=samples if audio else None, crf=28, preset="ultrafast")
    return spans


# Names of the clips written by write_clip_folder: what each one is for.
GOOD = "speaker.mp4"  # three phrases, two pauses: segments 0 (first), 1 (middle), 2 (last)
NON_ASCII = "sub/vidéo_会話.mp4"  # two phrases, a non-ASCII name in a sub-folder
NO_FACE = "noface.mp4"  # speech, but no face in the picture
NO_AUDIO = "noaudio.mp4"  # a face, no audio stream
JUNK = "junk.mp4"  # random bytes


def write_clip_folder(folder: str | os.PathLike[str]) -> dict[str, list[tuple[float, float]]]:
    """Write the test clips (see the names above) into ``folder``; returns the phrase spans
    of the clips with speech, by name."""
    folder = Path(folder)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    spans = {
        GOOD: write_talking_head(folder / GOOD),
        NON_ASCII: write_talking_head(folder / NON_ASCII, PHRASES[1:], seed=1),
        NO_FACE: write_talking_head(folder / NO_FACE, PHRASES[:2], face=False, seed=2),
    }
    write_talking_head(folder / NO_AUDIO, PHRASES[:1], audio=False)
    (folder / JUNK).write_bytes(np.random.default_rng(3).bytes(20000))
    return spans


def prepared_dataset(base: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The test clips and their prepared dataset, made once under ``base`` (a session's
    temporary folder) and reused: (clips folder, dataset folder). Copy the dataset before
    changing it."""
    from smart_turn_mm.prepare import prepare_dataset

    base = Path(base)
    clips, out = base / "clips", base / "prepared"
    if not (out / "prepared.jsonl").is_file():
        write_clip_folder(clips)
        prepare_dataset(clips, out, workers=2, progress=False, log=lambda line: None)
    return clips, out
