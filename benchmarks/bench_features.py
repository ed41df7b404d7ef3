"""Time the audio front end against transformers' WhisperFeatureExtractor, side by side.

    python benchmarks/bench_features.py --runs 50 [--json results.json]

Both extractors get the same 128,000-sample (8 s) window of speech-like audio; ours is also
timed on a 3 s clip (left-padded to the window inside `whisper_features`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smart_turn_mm import audio as A

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"  # holds signals.py


def _time_ms(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": statistics.fmean(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per case (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch.set_num_threads for transformers (default: torch's)",
    )
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from transformers import WhisperFeatureExtractor

    from smart_turn_mm.bench import reference_features

    sys.path.insert(0, str(TESTS_DIR))
    from signals import speech_like

    extractor = WhisperFeatureExtractor(feature_size=A.N_MELS, chunk_length=A.WINDOW_SECONDS)
    window = A.last_window(speech_like(A.WINDOW_SECONDS))
    clip_3s = speech_like(3.0, seed=1)

    def reference() -> np.ndarray:
        return reference_features(extractor, window)[0]

    max_err = float(np.abs(A.whisper_features(window) - reference()).max())
    cases = {
        "smart_turn_mm whisper_features, 8 s": lambda: A.whisper_features(window),
        "transformers WhisperFeatureExtractor, 8 s": reference,
        "smart_turn_mm whisper_features, 3 s": lambda: A.whisper_features(clip_3s),
    }
    # Rounds of short blocks: every case sees the same machine load over the run, and each
    # block is warmed up first, so one library's idle threads (torch's OpenMP pool spins for a
    # while after each call) do not slow the other's first calls.
    rounds = max(1, min(5, args.runs))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(rounds):
        block = args.runs // rounds + (i < args.runs % rounds)
        for name, fn in cases.items():
            times[name] += _time_ms(fn, block, args.warmup if i == 0 else 2)
    results = {name: _summary(t) for name, t in times.items()}
    ours = results["smart_turn_mm whisper_features, 8 s"]["p50_ms"]

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    threads = f", torch threads {args.torch_threads}" if args.torch_threads else ""
    print(f"{args.runs} runs, {cpu}{threads}, max abs diff vs transformers {max_err:.2g}")
    print()
    print("| case | P50 ms | P90 ms | mean ms | P50 vs ours (8 s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = r["p50_ms"] / ours
        cells = f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['mean_ms']:.2f} | {ratio:.2f}x"
        print(f"| {name} | {cells} |")
    if args.json:
        args.json.write_text(
            json.dumps({"runs": args.runs, "max_abs_diff": max_err, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
