"""Time ``smart-turn-mm prepare`` on generated talking-head videos: files per second.

    python benchmarks/bench_prepare.py [--files 10] [--seconds 10] [--size 640x480] [--workers N]

Each video is made here (not timed): the astronaut's face (scikit-image) drifting over a
moving background, espeak-ng speech with 0.9 s pauses between phrases until about
``--seconds`` long, H.264 + AAC at 25 fps. Then the whole of prepare runs on the folder, as
the command does (processes, VAD, face boxes, crops, encodes, metadata), and is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"

PHRASES = (
    "I went to the market this morning",
    "and then I bought some apples",
    "the weather was lovely all day",
    "so we walked along the river",
    "that is all I wanted to say",
)


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="about this long each")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the videos")
    parser.add_argument("--workers", type=int, default=None, help="default: CPU count")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS_DIR))
    from talking_heads import speech_with_pauses, write_talking_head

    from smart_turn_mm.audio import SAMPLE_RATE
    from smart_turn_mm.prepare import prepare_dataset

    width, height = (int(v) for v in args.size.lower().split("x"))
    phrases = [PHRASES[0]]
    while len(speech_with_pauses(phrases)[0]) / SAMPLE_RATE < args.seconds:
        phrases.append(PHRASES[len(phrases) % len(PHRASES)])
    with tempfile.TemporaryDirectory() as tmp:
        videos, out = Path(tmp) / "videos", Path(tmp) / "out"
        videos.mkdir()
        for i in range(args.files):
            write_talking_head(
                videos / f"talk_{i:03d}.mp4",
                phrases,
                width=width,
                height=height,
                seed=i,
                scale=height / 480,
            )
        seconds = len(speech_with_pauses(phrases)[0]) / SAMPLE_RATE
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        summary = prepare_dataset(videos, out, workers=args.workers, progress=False)
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    workers = args.workers or os.cpu_count() or 1
    result = {
        "files": args.files,
        "video_seconds_each": round(seconds, 2),
        "size": f"{width}x{height}",
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "segments": summary.segments,
        "done": summary.done,
        "wall_s": round(elapsed, 2),
        "files_per_s": round(args.files / elapsed, 3),
        "segments_per_s": round(summary.segments / elapsed, 2),
        "realtime_factor": round(args.files * seconds / elapsed, 2),
        # CPU time (this process and its workers): unlike wall time, not inflated by other
        # programs on a busy machine; files/s on ``workers`` otherwise idle cores follows
        "cpu_s_per_file": round(cpu / args.files, 3),
        "files_per_s_if_idle": round(workers * args.files / cpu, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if summary.done == args.files else 1


if __name__ == "__main__":
    raise SystemExit(main())
