"""Time the video front end against the published method, side by side.

    python benchmarks/bench_video.py --runs 20 [--json results.json]

The clip is made here: 3 s, 30 fps, 640 x 480 H.264 (libx264 defaults: B-frames, one
keyframe) with AAC audio, the astronaut's face (scikit-image) drifting over a moving
background. Cases, each from the file path to the float32 (3, 32, 112, 112) tensor:

* published method: decode every frame with PyAV, convert each to a PIL image, crop it to
  the face box and resize it with PIL (bilinear), keep the last 32, stack, normalise. The
  face box is computed once beforehand and not timed (the published code ran a detector too).
* ``prepare_video(path)``: ours, face detection included (ONNX Runtime, default threads).
* ``prepare_video(path, face_crop=False)``: ours without detection.

Stages of ours are timed as well: the tail decode, the clip's face box, crop + resize,
padding + normalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smart_turn_mm import face as F
from smart_turn_mm import video as V

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"  # holds media.py


def _time_ms(fn: Callable[[], object], runs: int, warmup: int) -> list[tuple[float, float]]:
    """(wall ms, process CPU ms: all threads) per run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3))
    return times


def _summary(times: list[tuple[float, float]]) -> dict[str, float]:
    wall = [t[0] for t in times]
    return {
        "p50_ms": float(np.percentile(wall, 50)),
        "p90_ms": float(np.percentile(wall, 90)),
        "mean_ms": statistics.fmean(wall),
        "cpu_p50_ms": float(np.percentile([t[1] for t in times], 50)),
    }


def published_method(path: Path, box: F.FaceBox) -> np.ndarray:
    """Decode every frame, PIL convert + crop + resize each, last 32, stack, normalise."""
    import av

    mean = np.asarray(V.KINETICS_MEAN, dtype=np.float32)
    std = np.asarray(V.KINETICS_STD, dtype=np.float32)
    size = (V.FRAME_SIZE, V.FRAME_SIZE)
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image().crop((box.x0, box.y0, box.x1, box.y1))
            frames.append(np.asarray(image.resize(size, resample=2)))  # 2: PIL bilinear
    clip = np.stack(frames[-V.NUM_FRAMES :]).astype(np.float32) / 255.0
    return ((clip - mean) / std).transpose(3, 0, 1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(TESTS_DIR))
    from media import face_frames, write_test_video

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip_640x480_3s.mp4"
        frames = face_frames(90, 480, 640, scale=1.0)
        write_test_video(path, frames, fps=30, audio=True)
        F.default_detector().detect(frames[0])  # create the ONNX Runtime session

        clip = V.prepare_video(path)
        tail, _ = V.read_last_frames(path)
        crops = F.crop_frames(tail, clip.box, V.FRAME_SIZE)
        reference = published_method(path, clip.box)
        max_diff = float(np.abs(reference - clip.pixel_values).max())
        mean_diff = float(np.abs(reference - clip.pixel_values).mean())

        cases = {
            "published: decode all, PIL crop+resize each": lambda: published_method(path, clip.box),
            "ours: prepare_video(path)": lambda: V.prepare_video(path),
            "ours: prepare_video(path, face_crop=False)": lambda: V.prepare_video(
                path, face_crop=False
            ),
            "  stage: read_last_frames": lambda: V.read_last_frames(path),
            "  stage: clip_face_box": lambda: F.clip_face_box(tail),
            "  stage: crop_frames": lambda: F.crop_frames(tail, clip.box, V.FRAME_SIZE),
            "  stage: pad_frames + normalize_clip": lambda: V.normalize_clip(
                V.pad_frames(crops, V.NUM_FRAMES)
            ),
        }
        # Rounds of short blocks, so every case sees the same machine load over the run.
        rounds = max(1, min(5, args.runs))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for i in range(rounds):
            block = args.runs // rounds + (i < args.runs % rounds)
            for name, fn in cases.items():
                times[name] += _time_ms(fn, block, args.warmup if i == 0 else 1)

    results = {name: _summary(t) for name, t in times.items()}
    published = results["published: decode all, PIL crop+resize each"]["p50_ms"]
    cpu = platform.processor() or platform.machine()
    print(
        f"{args.runs} runs, {cpu}, {os.cpu_count()} cores; 3 s 640x480 30 fps H.264 + AAC; "
        f"face found: {clip.face_found}, box {clip.box}"
    )
    print(
        f"ours vs published tensors (different resize filters): max abs diff {max_diff:.3f}, "
        f"mean {mean_diff:.4f} (normalised units)"
    )
    print()
    print("| case | P50 ms | P90 ms | mean ms | CPU ms (P50) | speedup (P50) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = published / r["p50_ms"]
        cells = " | ".join(f"{r[k]:.1f}" for k in ("p50_ms", "p90_ms", "mean_ms", "cpu_p50_ms"))
        print(f"| {name} | {cells} | {ratio:.1f}x |")
    if args.json:
        payload = {
            "runs": args.runs,
            "cores": os.cpu_count(),
            "face_found": clip.face_found,
            "max_abs_diff": max_diff,
            "mean_abs_diff": mean_diff,
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
