"""Decision delay after the redemption time, replaying a conversation in real time.

    python benchmarks/bench_realtime.py [--model MODEL.onnx ...] [--json results.json]

A conversation of espeak-ng speech with real pauses (mid-turn pauses after "um" and "I think
we should", turn ends after questions) is written as an MP4 (H.264 30 fps, 320 x 240, the
astronaut's face from the test media) and replayed through
:class:`~smart_turn_mm.realtime.TurnDetector` in real time (``replay(..., speed=1)``: audio in
20 ms chunks at the wall-clock pace, frames at their timestamps, decisions delivered as soon as
the model finishes). For each model: the median and P90 of ``delay_after_redemption_ms`` (how
long after the redemption time ran out each decision came) and of ``model_ms``.

Models: the Smart Turn v3.2 int8 file from pipecat-ai (audio-only), a tiny multimodal export
(audio + video, made here), and every ``--model`` given (e.g. a published-size export).
The machine may be shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from smart_turn_mm.audio import SAMPLE_RATE
from smart_turn_mm.inference import load_model
from smart_turn_mm.locations import find_smart_turn_v3_onnx
from smart_turn_mm.media import write_video
from smart_turn_mm.realtime import DetectorParams
from smart_turn_mm.replay import replay

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
FPS = 30
# (text, silence after it in seconds): mid-turn pauses and turn ends.
SCRIPT = (
    ("I think we should", 0.8),
    ("go to the beach tomorrow.", 2.5),
    ("What time is it?", 2.5),
    ("so I was going to, um", 1.0),
    ("call my sister later.", 2.5),
    ("Can you tell me the weather in Paris?", 2.5),
    ("and then we", 0.9),
    ("bought some apples.", 2.5),
    ("Thank you very much.", 2.5),
)


def conversation_clip(path: Path) -> float:
    """Write the conversation with a talking face; returns its length in seconds."""
    sys.path.insert(0, str(TESTS_DIR))
    from media import face_frames
    from talking_heads import espeak

    parts = [np.zeros(SAMPLE_RATE // 2, np.float32)]
    for text, pause in SCRIPT:
        parts += [espeak(text), np.zeros(round(pause * SAMPLE_RATE), np.float32)]
    audio = np.concatenate(parts)
    seconds = len(audio) / SAMPLE_RATE
    write_video(path, face_frames(int(seconds * FPS), 240, 320), FPS, audio=audio)
    return seconds


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(TESTS_DIR))
    from tiny_models import tiny_multimodal_onnx

    return tiny_multimodal_onnx(folder)


def measure(model_path: Path, clip: Path, params: DetectorParams) -> dict:
    model = load_model(model_path)
    result = replay(clip, clip if model.has_video else None, model=model, params=params, speed=1)
    s = result.summary
    return {
        "model": str(model_path),
        "kind": "audio+video" if model.has_video else "audio-only",
        "decisions": s["decisions"],
        "with_video": s["decisions_with_video"],
        "commits_by_model": s["commits_by_model"],
        "commits_by_max_silence": s["commits_by_max_silence"],
        "delay_p50_ms": s["delay_after_redemption_ms"]["median"],
        "delay_p90_ms": s["delay_after_redemption_ms"]["p90"],
        "model_p50_ms": s["model_ms"]["median"],
        "model_p90_ms": s["model_ms"]["p90"],
        "audio_s": result.audio_s,
        "wall_s": result.wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="extra models")
    parser.add_argument("--redemption-ms", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    params = DetectorParams(redemption_ms=args.redemption_ms)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "conversation.mp4"
        seconds = conversation_clip(clip)
        print(f"conversation: {seconds:.1f} s, replayed in real time per model", file=sys.stderr)
        models = [find_smart_turn_v3_onnx(), tiny_model(Path(tmp) / "tiny"), *args.model]
        for path in models:
            if path is None:
                continue
            rows.append(measure(Path(path), clip, params))
            print(json.dumps(rows[-1]), file=sys.stderr)
    load_after = os.getloadavg()
    print(
        f"\nredemption {args.redemption_ms:.0f} ms; {os.cpu_count()} CPUs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    print("| model | kind | decisions | delay P50 | delay P90 | model P50 | model P90 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {Path(r['model']).name} | {r['kind']} | {r['decisions']} "
            f"| {r['delay_p50_ms']:.1f} ms | {r['delay_p90_ms']:.1f} ms "
            f"| {r['model_p50_ms']:.1f} ms | {r['model_p90_ms']:.1f} ms |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"load": [load_before, load_after], "results": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
