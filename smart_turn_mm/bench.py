"""Latency benchmark: ours vs the published method, side by side, on the same model files.

Reproduces the published tables (SPEC 8): direct inference on precomputed inputs, audio
features, video preprocessing and end-to-end, as P50 / P90 / mean ms and throughput, for fp32
and int8, audio-only and audio+video, on the CPU provider and, when present, CUDA.

The published method, re-implemented here as the baseline: transformers'
``WhisperFeatureExtractor``; decode every frame with PyAV, convert each to a PIL image and
resize the whole frame with PIL's default filter (the published ``inference_multimodal.py``
does no face crop); one combined ONNX session (default options) that runs the video backbone
on all-zero pixels when there is no video. A stricter video row is added: the published
steps with a crop to the face box (found beforehand, not timed) before a bilinear resize;
and a like-for-like one: ours without face detection (``face_crop=False``), as published.
Ours: ``whisper_features``, ``prepare_video`` (seek to the tail, frames kept as YUV, one
FFmpeg crop+resize per frame), the split sessions (audio-only calls skip the backbone; with
video, the audio graph runs in a 1-thread session beside the video graph) with thread spinning
off, i.e. ``TurnModel.predict`` and ``predict_endpoint``.

Timed calls are separated by an idle gap (``--gap-ms``): on 2 cores ONNX Runtime's spinning
worker threads otherwise distort back-to-back timings. Cases are interleaved in rounds so that
every case sees the same machine load.

    smart-turn-mm bench [--model DIR] [--runs 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.audio import N_SAMPLES, SAMPLE_RATE, last_window, load_audio, whisper_features
from smart_turn_mm.video import KINETICS_MEAN, KINETICS_STD, prepare_video

CLIP_SECONDS = 3.0
CLIP_FPS = 30
CLIP_SIZE = (640, 480)  # width, height
COMBINED = {"fp32": "smart-turn-multimodal-gpu.onnx", "int8": "smart-turn-multimodal-cpu.onnx"}
TURN_TEXT = "Could you tell me what time the pharmacy on the corner closes today?"


# --------------------------------------------------------------------------- the clip


def _speech(seconds: float) -> np.ndarray:
    """Real TTS speech from espeak-ng when installed, else a voiced harmonic signal."""
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "speech.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), TURN_TEXT], check=True)
            audio = load_audio(wav)
    else:
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        voice = sum(np.sin(k * phase) / k for k in range(1, 20))
        audio = (0.3 * voice * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)).astype(np.float32)
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    speech = audio[: n - SAMPLE_RATE // 5]  # end with 200 ms of silence
    out[: len(speech)] = speech
    return out


def _face_image() -> np.ndarray:
    """A real face photo (scikit-image's astronaut) when installed, else a drawn face."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    png = Path(spec.submodule_search_locations[0]) / "data" / "astronaut.png" if spec else None
    if png is not None and png.is_file():
        import av

        with av.open(str(png)) as container:
            image = next(container.decode(video=0)).to_ndarray(format="rgb24")
        return image[20:240, 130:320]
    yy, xx = np.mgrid[:220, :190]
    face = np.full((220, 190, 3), 60, np.uint8)
    face[((yy - 110) / 95) ** 2 + ((xx - 95) / 75) ** 2 < 1] = (224, 180, 150)
    for cx in (65, 125):
        face[((yy - 90) / 8) ** 2 + ((xx - cx) / 12) ** 2 < 1] = (40, 30, 30)
    face[((yy - 160) / 8) ** 2 + ((xx - 95) / 30) ** 2 < 1] = (150, 60, 60)
    return face


def make_clip(folder: Path) -> tuple[Path, Path]:
    """Write the benchmark clip: 3 s, 30 fps, 640x480 H.264 + AAC, a face drifting over a
    moving background; plus the same speech as a 16 kHz WAV. Returns (wav, mp4)."""
    from smart_turn_mm.media import write_video, write_wav

    width, height = CLIP_SIZE
    n = int(CLIP_SECONDS * CLIP_FPS)
    face = _face_image()
    background = np.empty((height, width, 3), np.uint8)
    background[..., 0] = (np.arange(width) % 256).astype(np.uint8)[None, :]
    background[..., 1] = (np.arange(height) % 256).astype(np.uint8)[:, None]
    background[..., 2] = 90

    def frames():
        fh, fw = face.shape[:2]
        for i in range(n):
            frame = background.copy()
            frame[..., 0] += np.uint8(3 * i % 256)
            x0 = (width - fw) // 2 + (i % 20) - 10
            y0 = (height - fh) // 2 + 2 * ((i // 10) % 3)
            frame[y0 : y0 + fh, x0 : x0 + fw] = face
            yield frame

    audio = _speech(CLIP_SECONDS)
    wav = write_wav(folder / "bench_turn.wav", audio)
    mp4 = write_video(  # libx264's own defaults, as a user's recording would be encoded
        folder / "bench_turn_640x480.mp4", frames(), CLIP_FPS, audio=audio, crf=None, preset=None
    )
    return wav, mp4


# --------------------------------------------------------------------------- the published method


def reference_features(extractor: Any, audio_16k: np.ndarray) -> np.ndarray:
    """transformers' ``WhisperFeatureExtractor`` on the left-padded 8 s window, called exactly as
    SPEC 1 states: (1, 80, 800) float32. The parity reference and the published method's step."""
    return extractor(
        last_window(audio_16k),
        sampling_rate=SAMPLE_RATE,
        return_tensors="np",
        padding="max_length",
        max_length=N_SAMPLES,
        truncation=True,
        do_normalize=True,
    ).input_features.astype(np.float32)


def published_video(
    path: Path,
    box: tuple[int, int, int, int] | None = None,
    num_frames: int = 32,
    size: int = 112,
) -> np.ndarray:
    """The published video path, as its ``inference_multimodal.py`` runs it: decode every
    frame, convert each to a PIL image and resize the WHOLE frame with Pillow's default
    filter (bicubic), keep the last ``num_frames`` (zero frames appended if fewer, as
    published), normalise in float64 with the Kinetics statistics: (1, 3, T, S, S) float32.

    ``box``: a stricter baseline than the published code, which never crops: crop each PIL
    image to this face box first, then resize with the bilinear filter (a smaller resize).

    Normalised per channel as the published code means to: as written, it subtracts a
    (3, 1, 1) mean indexed ``[:, None, None]`` from the (3, T, S, S) clip, which broadcasts to
    (3, 3, T, S, S), three times the float64 work, and a 6-D input that ONNX Runtime rejects.
    """
    import av
    from PIL import Image

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()
            if box is None:
                frames.append(image.resize((size, size)))
            else:
                frames.append(image.crop(box).resize((size, size), Image.BILINEAR))
    clip = np.stack([np.array(f) for f in frames[-num_frames:]]).astype(np.float32) / 255.0
    clip = clip.transpose(3, 0, 1, 2)
    mean = np.asarray(KINETICS_MEAN).reshape(3, 1, 1, 1)  # float64, as published
    std = np.asarray(KINETICS_STD).reshape(3, 1, 1, 1)
    clip = (clip - mean) / std
    if clip.shape[1] < num_frames:
        clip = np.pad(clip, ((0, 0), (0, num_frames - clip.shape[1]), (0, 0), (0, 0)))
    return clip[None].astype(np.float32)


class PublishedMethod:
    """The published inference code path, as the baseline (needs transformers and Pillow)."""

    def __init__(self, combined: Path, providers: list[str]) -> None:
        import onnxruntime as ort
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=8)
        self.session = ort.InferenceSession(str(combined), providers=providers)
        shape = self.session.get_inputs()[1].shape
        self.video_shape = tuple(int(d) for d in shape[1:])

    def features(self, audio: np.ndarray) -> np.ndarray:
        return reference_features(self.extractor, audio)

    def video(self, path: Path, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        _, num_frames, size, _ = self.video_shape
        return published_video(path, box, num_frames, size)

    def model(self, features: np.ndarray, pixels: np.ndarray | None) -> float:
        if pixels is None:  # the published no-video path: zero pixels through the backbone
            pixels = np.zeros((features.shape[0], *self.video_shape), np.float32)
        out = self.session.run(None, {"input_features": features, "pixel_values": pixels})
        return float(out[0][0, 0])


# --------------------------------------------------------------------------- timing


@dataclass
class Case:
    stage: str
    precision: str
    provider: str
    method: str  # "published" or "ours"
    fn: Callable[[], Any]


def _stats(times_ms: list[float]) -> dict[str, float]:
    mean = statistics.fmean(times_ms)
    return {
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": mean,
        "throughput_per_s": 1000.0 / mean,
        "runs": len(times_ms),
    }


def _run_cases(cases: list[Case], runs: int, warmup: int, gap_ms: float) -> list[list[float]]:
    from tqdm import tqdm

    times: list[list[float]] = [[] for _ in cases]
    for case in cases:
        for _ in range(warmup):
            case.fn()
    rounds = max(1, min(5, runs))
    with tqdm(total=runs * len(cases), desc="bench", unit="call", leave=False) as bar:
        for r in range(rounds):
            block = runs // rounds + (r < runs % rounds)
            for i, case in enumerate(cases):
                for _ in range(block):
                    time.sleep(gap_ms / 1000.0)
                    start = time.perf_counter()
                    case.fn()
                    times[i].append((time.perf_counter() - start) * 1e3)
                    bar.update()
    return times


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor()
    info = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
    for line in info.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in info or "avx_vnni" in info,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- model files


def build_published_size_model(out_dir: Path, clip_dir: Path) -> Path:
    """Export a published-size model (audio branch from Smart Turn v3.2 when pipecat-ai is
    installed, video branch Kinetics-free random init, seed 0) to fp32 + int8 ONNX, calibrated
    on real front-end outputs of generated clips. Needs the ``train`` extra (torch)."""
    import torch

    from smart_turn_mm.export import CalibrationData, export_onnx
    from smart_turn_mm.locations import find_smart_turn_v3_onnx
    from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal
    from smart_turn_mm.weights import init_audio_from_smart_turn_onnx

    torch.manual_seed(0)
    model = SmartTurnMultimodal(ModelConfig.published()).eval()
    if find_smart_turn_v3_onnx() is not None:
        init_audio_from_smart_turn_onnx(model)
    wav, mp4 = make_clip(clip_dir)
    calibration = CalibrationData.from_files([wav] * 4, [mp4] * 4)
    export_onnx(model, out_dir, calibration=calibration, allow_int8_mismatch=True)
    return out_dir


# --------------------------------------------------------------------------- main


def run_benchmark(
    model_dir: Path,
    *,
    runs: int = 20,
    warmup: int = 3,
    gap_ms: float = 50.0,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    clip_dir: Path | None = None,
) -> dict[str, Any]:
    """Time every stage for ours and the published method; returns the JSON-able results."""
    import onnxruntime as ort

    from smart_turn_mm.face import clip_face_box
    from smart_turn_mm.inference import TurnModel, predict_endpoint
    from smart_turn_mm.video import read_last_frames

    tmp = tempfile.TemporaryDirectory()
    clip_dir = clip_dir or Path(tmp.name)
    wav, mp4 = make_clip(clip_dir)
    audio = load_audio(wav)
    box, face_found = clip_face_box(read_last_frames(mp4)[0])
    box_tuple = (box.x0, box.y0, box.x1, box.y1)
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")

    cases: list[Case] = []
    front_done = False
    for provider in providers:
        provs = (
            [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        )
        tag = "cuda" if provider.startswith("CUDA") else "cpu"
        for precision in precisions:
            path = model_dir / COMBINED[precision]
            if not path.is_file():
                continue
            pub = PublishedMethod(path, provs)
            ours = TurnModel(path, tuple(provs), None)
            feats = whisper_features(audio)[None]
            shape = {"num_frames": ours.num_frames, "size": ours.frame_size}
            pixels = prepare_video(mp4, **shape).pixel_values[None]

            def add(
                stage: str,
                published: Callable[[], Any],
                mine: Callable[[], Any],
                precision: str = precision,
                tag: str = tag,
            ) -> None:
                cases.append(Case(stage, precision, tag, "published", published))
                cases.append(Case(stage, precision, tag, "ours", mine))

            add(
                "inference only, audio+video",
                lambda pub=pub, f=feats, p=pixels: pub.model(f, p),
                lambda ours=ours, f=feats, p=pixels: ours.predict(f, p),
            )
            add(
                "inference only, audio-only",
                lambda pub=pub, f=feats: pub.model(f, None),
                lambda ours=ours, f=feats: ours.predict(f),
            )
            if not front_done:  # the front ends do not depend on the model or provider
                add(
                    "audio features",
                    lambda pub=pub: pub.features(audio),
                    lambda: whisper_features(audio),
                )
                add(
                    "video preprocessing",
                    lambda pub=pub: pub.video(mp4),
                    lambda shape=shape: prepare_video(mp4, **shape),
                )
                add(
                    "video preprocessing, baseline given the face box",
                    lambda pub=pub: pub.video(mp4, box_tuple),
                    lambda shape=shape: prepare_video(mp4, **shape),
                )
                add(  # like for like: neither side runs a face detector
                    "video preprocessing, ours without face detection",
                    lambda pub=pub: pub.video(mp4),
                    lambda shape=shape: prepare_video(mp4, face_crop=False, **shape),
                )
                front_done = True
            add(
                "end-to-end, audio+video",
                lambda pub=pub: pub.model(pub.features(audio), pub.video(mp4)),
                lambda ours=ours: predict_endpoint(audio, mp4, model=ours),
            )
            add(
                "end-to-end, audio-only",
                lambda pub=pub: pub.model(pub.features(audio), None),
                lambda ours=ours: predict_endpoint(audio, model=ours),
            )
    if not cases:
        raise FileNotFoundError(f"no {' or '.join(COMBINED.values())} in {model_dir}")
    times = _run_cases(cases, runs, warmup, gap_ms)
    rows = []
    for case, t in zip(cases, times, strict=True):
        rows.append(
            {
                "stage": case.stage,
                "precision": case.precision
                if "inference" in case.stage or "end" in case.stage
                else "-",
                "provider": case.provider,
                "method": case.method,
                **_stats(t),
            }
        )
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.onnx"))}
    tmp.cleanup()
    return {
        "machine": machine_info(),
        "model_dir": str(model_dir),
        "model_files_bytes": sizes,
        "clip": f"{CLIP_SECONDS:g} s, {CLIP_FPS} fps, {CLIP_SIZE[0]}x{CLIP_SIZE[1]} H.264 + AAC",
        "face_found": face_found,
        "runs": runs,
        "warmup": warmup,
        "gap_ms": gap_ms,
        "rows": rows,
    }


def to_markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, VNNI: {m['avx512_vnni']}; "
        f"onnxruntime {m['onnxruntime']}; Python {m['python']}.",
        f"Clip: {results['clip']} (face found: {results['face_found']}); "
        f"{results['runs']} timed runs per case after {results['warmup']} warm-up, "
        f"{results['gap_ms']:g} ms idle gap between calls.",
        "",
        "| stage | precision | provider | published P50 | P90 | mean | ours P50 | P90 | mean "
        "| ours/s | speed-up (P50) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = results["rows"]
    for pub, ours in zip(rows[::2], rows[1::2], strict=True):
        ratio = pub["p50_ms"] / ours["p50_ms"]
        lines.append(
            f"| {pub['stage']} | {pub['precision']} | {pub['provider']} "
            f"| {pub['p50_ms']:.1f} | {pub['p90_ms']:.1f} | {pub['mean_ms']:.1f} "
            f"| {ours['p50_ms']:.1f} | {ours['p90_ms']:.1f} | {ours['mean_ms']:.1f} "
            f"| {ours['throughput_per_s']:.1f} | {ratio:.2f}x |"
        )
    lines.append("")
    lines.append(
        "Times in ms. Model files: "
        + ", ".join(
            f"{name} {size / 1e6:.1f} MB" for name, size in results["model_files_bytes"].items()
        )
    )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        help="export directory with smart-turn-multimodal-{gpu,cpu}.onnx (default: build a "
        "published-size model once into --cache)",
    )
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/published-size"))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=50.0, help="idle gap between calls")
    parser.add_argument("--precision", choices=("fp32", "int8", "both"), default="both")
    parser.add_argument("--out", type=Path, help="write RESULTS.md-style markdown + JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")


def run(args: argparse.Namespace) -> int:
    model_dir = args.model
    if model_dir is None:
        model_dir = args.cache
        if not (model_dir / COMBINED["fp32"]).is_file():
            print(f"building a published-size model in {model_dir} (once) ...", file=sys.stderr)
            with tempfile.TemporaryDirectory() as tmp:
                build_published_size_model(model_dir, Path(tmp))
    precisions = ("fp32", "int8") if args.precision == "both" else (args.precision,)
    results = run_benchmark(
        model_dir, runs=args.runs, warmup=args.warmup, gap_ms=args.gap_ms, precisions=precisions
    )
    command = "smart-turn-mm bench " + " ".join(sys.argv[2:])
    markdown = to_markdown(results, command.strip())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latency.md").write_text(markdown)
        (args.out / "latency.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2) if args.json else markdown)
    return 0
