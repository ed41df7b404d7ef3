"""Time the video front end against the published method, side by side.

    python benchmarks/bench_video.py --runs 20 [--gop 30] [--json results.json]

The clip is made here: 3 s, 30 fps, 640 x 480 H.264 from libx264 with its default settings
(preset medium, crf 23: B-frames, one keyframe) and AAC audio, the astronaut's face
(scikit-image) drifting over a moving background. ``--gop N`` puts a keyframe every N frames
instead: ours decodes from the keyframe before
the last 32 frames, so its decode shrinks with the keyframe interval, while the published
method decodes every frame whatever it is. Cases, each from the file path to the float32
(3, 32, 112, 112) tensor:

* published method, as its ``inference_multimodal.py`` runs it (the baseline of the ratios):
  decode every frame with PyAV, convert each to a PIL image, resize the whole frame with
  PIL's default filter (bicubic), keep the last 32, stack, normalise in float64. It does no
  face crop.
* published method given the face box (a stricter baseline): the same, but each PIL image is
  cropped to the face box (computed once beforehand, not timed) and resized bilinearly.
* ``prepare_video(path)``: ours, face detection included (ONNX Runtime, default threads).
* ``prepare_video(path, face_crop=False)``: ours without detection.

Stages of ours are timed as well: the tail decode (frames stay YUV), the clip's face box
(three frames converted to RGB and detected, one after the other here: prepare_video runs
two of them on a worker thread during the decode), crop + resize of the YUV frames, padding
+ normalisation; and, for comparison, the RGB path that ``prepare_video(frames)`` takes:
``read_last_frames`` (decode + 32 full-frame RGB conversions) and the crop of RGB frames.

The machine may be shared: cases run in interleaved rounds, and the process CPU time (all
threads) is reported beside the wall time, with the load average before and after.
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
from smart_turn_mm.bench import published_video
from smart_turn_mm.media import write_video

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
        "p10_ms": float(np.percentile(wall, 10)),
        "p50_ms": float(np.percentile(wall, 50)),
        "p90_ms": float(np.percentile(wall, 90)),
        "mean_ms": statistics.fmean(wall),
        "cpu_p50_ms": float(np.percentile([t[1] for t in times], 50)),
    }


def published_method(path: Path, box: F.FaceBox | None = None) -> np.ndarray:
    """The published video path (decode all, PIL resize each; with ``box``: crop first)."""
    crop = None if box is None else (box.x0, box.y0, box.x1, box.y1)
    return published_video(path, crop, V.NUM_FRAMES, V.FRAME_SIZE)[0]


def write_clip(
    path: Path, frames: list[np.ndarray], fps: int = 30, gop_size: int | None = None
) -> None:
    """H.264 with libx264's default settings (no options set; ``gop_size``: a keyframe every
    that many frames instead of libx264's 250) + a 440 Hz AAC track."""
    t = np.arange(int(len(frames) / fps * 16000)) / 16000
    audio = 0.2 * np.sin(2 * np.pi * 440 * t)
    write_video(path, frames, fps, audio=audio, crf=None, preset=None, gop_size=gop_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument(
        "--gop", type=int, help="a keyframe every GOP frames (default: libx264's own, 250)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.gop is not None and args.gop < 1:
        parser.error(f"--gop must be at least 1, got {args.gop}")

    sys.path.insert(0, str(TESTS_DIR))
    from media import face_frames

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip_640x480_3s.mp4"
        frames = face_frames(90, 480, 640, scale=1.0)
        write_clip(path, frames, fps=30, gop_size=args.gop)
        detector = F.default_detector()
        detector.detect(frames[0])  # create the ONNX Runtime session

        clip = V.prepare_video(path)
        tail = V._decode_tail(path, V.NUM_FRAMES)
        decoded, decoded_count = tail.frames, tail.num_decoded  # av.VideoFrame (YUV)
        height, width = decoded[0].height, decoded[0].width
        rgb, _ = V.read_last_frames(path)
        rgb_path = V.prepare_video(rgb)
        crops = F.crop_frames(decoded, clip.box, V.FRAME_SIZE)
        reference = published_method(path, clip.box)
        diffs = {
            "published": np.abs(reference - clip.pixel_values),
            "rgb_path": np.abs(rgb_path.pixel_values - clip.pixel_values),
        }

        def face_box() -> tuple[F.FaceBox, bool]:
            faces = [
                detector.detect(decoded[i].to_ndarray(format="rgb24", **F.sws_options()))
                for i in F.clip_detection_frames(len(decoded))
            ]
            return F.clip_box_from_faces(faces, height, width)

        cases = {
            "published: decode all, PIL resize each": lambda: published_method(path),
            "published given the face box: PIL crop+resize each": lambda: published_method(
                path, clip.box
            ),
            "ours: prepare_video(path)": lambda: V.prepare_video(path),
            "ours: prepare_video(path, face_crop=False)": lambda: V.prepare_video(
                path, face_crop=False
            ),
            "  stage: decode the last 32 frames (YUV)": lambda: V._decode_tail(path, V.NUM_FRAMES),
            "  stage: face box (3 frames to RGB + detect)": face_box,
            "  stage: crop_frames (YUV frames)": lambda: F.crop_frames(
                decoded, clip.box, V.FRAME_SIZE
            ),
            "  stage: pad_frames + normalize_clip": lambda: V.normalize_clip(
                V.pad_frames(crops, V.NUM_FRAMES)
            ),
            "  RGB path: read_last_frames": lambda: V.read_last_frames(path),
            "  RGB path: crop_frames (RGB frames)": lambda: F.crop_frames(
                rgb, clip.box, V.FRAME_SIZE
            ),
        }
        # Rounds of short blocks, so every case sees the same machine load over the run.
        rounds = max(1, min(5, args.runs))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for i in range(rounds):
            block = args.runs // rounds + (i < args.runs % rounds)
            for name, fn in cases.items():
                times[name] += _time_ms(fn, block, args.warmup if i == 0 else 1)

    load_after = os.getloadavg()
    results = {name: _summary(t) for name, t in times.items()}
    published = results["published: decode all, PIL resize each"]
    cpu = platform.processor() or platform.machine()
    keyframes = "libx264 defaults" if args.gop is None else f"libx264 defaults, GOP {args.gop}"
    print(
        f"{args.runs} runs, {cpu}, {os.cpu_count()} cores, load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after; 3 s 640x480 30 fps H.264 ({keyframes}) + "
        f"AAC; ours decodes {decoded_count} frames; face found: {clip.face_found}, box {clip.box}"
    )
    for name, what in (
        ("published", "ours vs published-with-box tensors (different resize filters)"),
        ("rgb_path", "ours vs prepare_video(read_last_frames(path)) (YUV vs RGB crop)"),
    ):
        d = diffs[name]
        print(
            f"{what}: max abs diff {d.max():.3f}, 99th percentile "
            f"{np.percentile(d, 99):.3f}, mean {d.mean():.4f} (normalised units)"
        )
    print()
    print(
        "| case | P10 ms | P50 ms | P90 ms | mean ms | CPU ms (P50) | speedup (P10) "
        "| speedup (P50) | speedup (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = ("p10_ms", "p50_ms", "p90_ms", "mean_ms", "cpu_p50_ms")
    for name, r in results.items():
        ratios = " | ".join(
            f"{published[k] / r[k]:.1f}x" for k in ("p10_ms", "p50_ms", "cpu_p50_ms")
        )
        cells = " | ".join(f"{r[k]:.1f}" for k in keys)
        print(f"| {name} | {cells} | {ratios} |")
    if args.json:
        payload = {
            "runs": args.runs,
            "gop": args.gop,
            "frames_decoded_by_ours": decoded_count,
            "cores": os.cpu_count(),
            "load_average": [load_before[0], load_after[0]],
            "face_found": clip.face_found,
            "max_abs_diff": float(diffs["published"].max()),
            "mean_abs_diff": float(diffs["published"].mean()),
            "rgb_path_max_abs_diff": float(diffs["rgb_path"].max()),
            "rgb_path_mean_abs_diff": float(diffs["rgb_path"].mean()),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
