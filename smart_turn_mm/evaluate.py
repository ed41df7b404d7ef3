"""Evaluate any model on any dataset: metrics with and without video, confidence intervals,
a per-sample CSV and ROC / PR / confusion-matrix plots.

Models: a torch checkpoint (directory or weights file, or a model in memory) or an ONNX file /
export directory (run with :mod:`smart_turn_mm.inference`; no torch needed). Every segment is
scored twice: with its video (``audio_video``) and with the video removed (``audio_only``, the
zero video embedding), the modality ablation. Segments without video get the same score twice.

Outputs of :func:`write_report` in ``out_dir``: ``metrics.json``, ``predictions.csv``,
``roc.png``, ``pr.png``, ``confusion.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from smart_turn_mm.dataset import Batch, Segment, iter_batches, load_audio_dataset
from smart_turn_mm.metrics import (
    BinaryMetrics,
    binary_metrics,
    bootstrap_ci,
    paired_bootstrap_ci,
    pr_curve,
    roc_curve,
)

__all__ = [
    "EvaluationReport",
    "OnnxScorer",
    "Scorer",
    "Scores",
    "TorchScorer",
    "add_evaluate_arguments",
    "evaluate",
    "load_scorer",
    "run_evaluate_from_args",
    "score_segments",
    "summarize",
    "write_report",
]

MODES = ("audio_video", "audio_only")
MODE_NAMES = {"audio_video": "audio+video", "audio_only": "audio only"}


# --------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """Scores batches with and without video."""

    has_video: bool
    num_frames: int
    frame_size: int
    name: str

    def score(
        self, batch: Batch, audio_cache: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities with video, probabilities with the video removed), each (B,)."""
        ...


class TorchScorer:
    """A :class:`~smart_turn_mm.model.SmartTurnMultimodal` in eval mode, run once for the audio
    embedding and twice for the head. ``audio_cache`` (segment key -> embedding) reuses audio
    embeddings while the audio branch is frozen (training stage 1)."""

    def __init__(self, model: Any, *, device: str = "auto", precision: str = "auto") -> None:
        import torch

        from smart_turn_mm.model import SmartTurnMultimodal

        if not isinstance(model, SmartTurnMultimodal):
            raise TypeError(f"expected a SmartTurnMultimodal, got {type(model).__name__}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model
        self.has_video = model.config.with_video
        self.num_frames = model.config.num_frames
        self.frame_size = model.config.frame_size
        self.name = "torch model"
        self.autocast_dtype = autocast_dtype(precision, self.device)

    def score(
        self, batch: Batch, audio_cache: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        model = self.model
        was_training = model.training
        model.eval()
        try:
            # no_grad, not inference_mode: cached embeddings are reused by training.
            with torch.no_grad(), autocast(self.device, self.autocast_dtype):
                features = torch.from_numpy(batch.features)
                keys = [s.key for s in batch.segments]
                audio = cached_audio_embeddings(model, features, keys, audio_cache, self.device)
                p_audio = torch.sigmoid(model.head(audio).float()).reshape(-1)
                p_av = p_audio
                if self.has_video and batch.pixels is not None:
                    mask = torch.from_numpy(batch.video_mask).to(self.device)
                    pixels = torch.from_numpy(batch.pixels).to(self.device)[mask]
                    video = audio.new_zeros(len(keys), model.config.video_dim)
                    video[mask] = model.encode_video(pixels).to(video.dtype)
                    p_av = torch.sigmoid(model.head(audio, video).float()).reshape(-1)
        finally:
            model.train(was_training)
        return p_av.cpu().numpy().astype(np.float64), p_audio.cpu().numpy().astype(np.float64)


def autocast_dtype(precision: str, device: Any) -> Any:
    """The autocast dtype for ``precision`` ("auto", "fp32", "bf16", "fp16") on ``device``, or
    None for fp32. "auto" is bf16 on CUDA devices that support it, fp16 on other CUDA devices,
    fp32 on CPU."""
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: Any, dtype: Any) -> Any:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for fp32 (None)."""
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cached_audio_embeddings(
    model: Any, features: Any, keys: Sequence[str], cache: dict[str, Any] | None, device: Any
) -> Any:
    """Audio embeddings (B, d) on ``device``; with a cache, only missing keys run the encoder
    (without gradients: only valid while the audio branch is frozen) and are stored (fp32, CPU).
    """
    import torch

    if cache is None:
        return model.encode_audio(features.to(device, non_blocking=True))
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        with torch.no_grad():
            new = model.encode_audio(features[missing].to(device, non_blocking=True))
        for i, embedding in zip(missing, new.float().cpu(), strict=True):
            cache[keys[i]] = embedding
    return torch.stack([cache[key] for key in keys]).to(device, non_blocking=True)


class OnnxScorer:
    """An ONNX model through :func:`smart_turn_mm.inference.load_model` (split graphs run the
    audio encoder once; other files are run with and without video)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        from smart_turn_mm.inference import load_model

        self.turn_model = load_model(path, threads=threads)
        self.has_video = self.turn_model.has_video
        self.num_frames = self.turn_model.num_frames or 1
        self.frame_size = self.turn_model.frame_size or 1
        self.name = str(self.turn_model.path)

    def score(
        self, batch: Batch, audio_cache: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        tm = self.turn_model
        if not self.has_video:
            p = tm.predict(batch.features).astype(np.float64)
            return p, p
        mask = batch.video_mask
        if tm.split:
            audio = tm.audio_embedding(batch.features)
            p_audio = tm.head(audio, None)
            p_av = p_audio.copy()
            if batch.pixels is not None and mask.any():
                video = tm.no_video_embedding(len(mask))
                video[mask] = tm.video_embedding(batch.pixels[mask])
                p_av = tm.head(audio, video)
            return p_av.astype(np.float64), p_audio.astype(np.float64)
        p_audio = tm.predict(batch.features, None).astype(np.float64)
        p_av = p_audio.copy()
        if batch.pixels is not None and mask.any():
            p_av[mask] = tm.predict(batch.features[mask], batch.pixels[mask])
        return p_av, p_audio


def load_scorer(
    model: Any, *, device: str = "auto", precision: str = "auto", threads: int | None = None
) -> Scorer:
    """A scorer for a model in memory, a torch checkpoint (directory with ``model.safetensors``,
    or a ``.safetensors`` / ``.pt`` file), or an ONNX file / directory of ONNX files."""
    if not isinstance(model, (str, os.PathLike)):
        return TorchScorer(model, device=device, precision=precision)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    is_torch_dir = path.is_dir() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    )
    if path.suffix == ".onnx" or (path.is_dir() and not is_torch_dir):
        return OnnxScorer(path, threads=threads)
    from smart_turn_mm.weights import load_pretrained

    scorer = TorchScorer(load_pretrained(path), device=device, precision=precision)
    scorer.name = str(path)
    return scorer


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scores:
    """Per-segment results, aligned with ``segments``."""

    segments: list[Segment]
    labels: np.ndarray  # (N,) 0/1
    audio_video: np.ndarray  # (N,) probabilities with video
    audio_only: np.ndarray  # (N,) probabilities with the video removed
    has_video: np.ndarray  # (N,) bool

    def select(self, mask: np.ndarray) -> Scores:
        idx = np.flatnonzero(mask)
        return Scores(
            [self.segments[i] for i in idx],
            self.labels[idx],
            self.audio_video[idx],
            self.audio_only[idx],
            self.has_video[idx],
        )


def score_segments(
    scorer: Scorer,
    segments: Sequence[Segment],
    *,
    batch_size: int = 16,
    audio_cache: dict[str, Any] | None = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> Scores:
    """Score labelled ``segments`` with and without video."""
    segments = [s for s in segments if s.label is not None]
    av, ao, mask = [], [], []
    batches = iter_batches(
        segments,
        batch_size=batch_size,
        num_frames=scorer.num_frames,
        frame_size=scorer.frame_size,
        with_video=scorer.has_video,
    )
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(segments) / batch_size), desc=desc)
    for batch in batches:
        p_av, p_a = scorer.score(batch, audio_cache)
        av.append(p_av)
        ao.append(p_a)
        mask.append(batch.video_mask)
    cat = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype)  # noqa: E731
    return Scores(
        segments=list(segments),
        labels=np.array([float(bool(s.label)) for s in segments]),
        audio_video=cat(av, np.float64),
        audio_only=cat(ao, np.float64),
        has_video=cat(mask, bool),
    )


# --------------------------------------------------------------------------- report


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics with video, with the video removed, their bootstrap intervals and the paired
    interval of the difference (audio+video minus audio-only)."""

    n: int
    with_video: int
    audio_video: BinaryMetrics
    audio_only: BinaryMetrics
    ci: dict[str, dict[str, tuple[float, float]]]
    delta_ci: dict[str, tuple[float, float]]
    confidence: float
    model: str = ""
    data: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "model": self.model,
                "data": self.data,
                "n": self.n,
                "with_video": self.with_video,
                "confidence": self.confidence,
                "audio_video": self.audio_video.to_dict(),
                "audio_only": self.audio_only.to_dict(),
                "ci": self.ci,
                "delta_ci": self.delta_ci,
                "files": self.files,
            }
        )

    def format_table(self) -> str:
        """A plain-text table: each metric with video, without, and the difference."""
        pct = f"{round(self.confidence * 100)}%"
        lines = [
            f"{self.n} segments ({self.with_video} with video); {pct} bootstrap intervals",
            f"{'metric':<18}{'audio+video':>24}{'audio only':>24}{'difference':>24}",
        ]
        av, ao = self.audio_video.to_dict(), self.audio_only.to_dict()
        for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "best_f1"):
            a, b = av[name], ao[name]
            diff = None if a is None or b is None else a - b
            cells = [
                _fmt(a, self.ci["audio_video"].get(name)),
                _fmt(b, self.ci["audio_only"].get(name)),
                _fmt(diff, self.delta_ci.get(name), signed=True),
            ]
            lines.append(f"{name:<18}" + "".join(f"{c:>24}" for c in cells))
        lines.append(
            f"{'best-F1 threshold':<18}{_fmt(av['best_f1_threshold']):>24}"
            f"{_fmt(ao['best_f1_threshold']):>24}"
        )
        return "\n".join(lines)


def _fmt(
    value: float | None, interval: tuple[float, float] | None = None, signed: bool = False
) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    if interval is not None and not any(v is None or math.isnan(v) for v in interval):
        text += f" [{interval[0]:.2f},{interval[1]:.2f}]"
    return text


def summarize(
    scores: Scores,
    *,
    threshold: float = 0.5,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    model: str = "",
    data: str = "",
) -> EvaluationReport:
    """Metrics for both modes, bootstrap intervals (``bootstrap`` resamples; 0 = none) and the
    paired interval of the difference."""
    kw = {"threshold": threshold, "n_resamples": bootstrap, "level": confidence, "seed": seed}
    y = scores.labels
    return EvaluationReport(
        n=len(y),
        with_video=int(scores.has_video.sum()),
        audio_video=binary_metrics(y, scores.audio_video, threshold),
        audio_only=binary_metrics(y, scores.audio_only, threshold),
        ci={m: bootstrap_ci(y, getattr(scores, m), **kw) for m in MODES}
        if bootstrap
        else {m: {} for m in MODES},
        delta_ci=paired_bootstrap_ci(y, scores.audio_video, scores.audio_only, **kw)
        if bootstrap
        else {},
        confidence=confidence,
        model=model,
        data=data,
    )


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_report(
    report: EvaluationReport, scores: Scores, out_dir: str | os.PathLike
) -> EvaluationReport:
    """Write metrics.json, predictions.csv, roc.png, pr.png and confusion.png into ``out_dir``;
    returns the report with ``files`` filled in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": out / "metrics.json",
        "predictions": out / "predictions.csv",
        "roc": out / "roc.png",
        "pr": out / "pr.png",
        "confusion": out / "confusion.png",
    }
    extra_keys = sorted(
        {
            k
            for s in scores.segments
            for k, v in s.fields.items()
            if isinstance(v, (str, int, float, bool)) or v is None
        }
    )
    threshold = report.audio_video.threshold
    with files["predictions"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "id",
                "dataset",
                "group",
                "audio",
                "video",
                "label",
                "has_video",
                "p_audio_video",
                "p_audio_only",
                "pred_audio_video",
                "pred_audio_only",
                *extra_keys,
            ]
        )
        for i, s in enumerate(scores.segments):
            audio = s.audio if isinstance(s.audio, str) else s.key
            writer.writerow(
                [
                    s.id,
                    s.dataset,
                    s.group,
                    audio,
                    _csv_value(s.video),
                    int(scores.labels[i]),
                    int(scores.has_video[i]),
                    f"{scores.audio_video[i]:.6f}",
                    f"{scores.audio_only[i]:.6f}",
                    int(scores.audio_video[i] > threshold),
                    int(scores.audio_only[i] > threshold),
                    *(_csv_value(s.fields.get(k)) for k in extra_keys),
                ]
            )
    _plot_curves(scores, report, files["roc"], files["pr"])
    _plot_confusion(report, files["confusion"])
    report = EvaluationReport(**{**report.__dict__, "files": {k: str(v) for k, v in files.items()}})
    files["metrics"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _plot_curves(scores: Scores, report: EvaluationReport, roc_path: Path, pr_path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    for path, kind in ((roc_path, "roc"), (pr_path, "pr")):
        fig = Figure(figsize=(5, 5), dpi=110)
        ax = fig.add_subplot()
        for mode in MODES:
            metrics = getattr(report, mode)
            if kind == "roc":
                x, y = roc_curve(scores.labels, getattr(scores, mode))
                label = f"{MODE_NAMES[mode]} (AUC {metrics.roc_auc:.3f})"
            else:
                y, x = pr_curve(scores.labels, getattr(scores, mode))
                x, y = np.r_[0.0, x], np.r_[y[:1], y]
                label = f"{MODE_NAMES[mode]} (AP {metrics.pr_auc:.3f})"
            ax.plot(x, y, drawstyle="steps-post" if kind == "pr" else "default", label=label)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        else:
            base = scores.labels.mean() if len(scores.labels) else 0.0
            ax.axhline(base, linestyle="--", color="grey", linewidth=1)
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        fig.savefig(path)


def _plot_confusion(report: EvaluationReport, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=110)
    for k, mode in enumerate(MODES):
        m = getattr(report, mode)
        matrix = np.array([[m.tn, m.fp], [m.fn, m.tp]])
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
        for (i, j), value in np.ndenumerate(matrix):
            color = "white" if value > matrix.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=12)
        ax.set_xticks([0, 1], ["incomplete", "complete"])
        ax.set_yticks([0, 1], ["incomplete", "complete"])
        ax.set(xlabel="predicted", ylabel="true")
        ax.set_title(f"{MODE_NAMES[mode]} (threshold {m.threshold:g})")
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- entry points


def evaluate(
    model: Any,
    data: str | os.PathLike | Sequence[Segment],
    *,
    out_dir: str | os.PathLike | None = None,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 16,
    threshold: float = 0.5,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> tuple[EvaluationReport, Scores]:
    """Evaluate ``model`` (see :func:`load_scorer`) on ``data`` (a dataset folder, a Hub dataset
    id / local dataset, or segments). Unlabelled segments are skipped. With ``out_dir``, the
    report files are written there.

    Returns:
        (report, per-segment scores).
    """
    if isinstance(data, (str, os.PathLike)):
        segments = load_audio_dataset(data, split=split, max_rows=limit)
        data_name = str(data)
    else:
        segments = list(data)[:limit] if limit is not None else list(data)
        data_name = f"{len(segments)} segments"
    segments = [s for s in segments if s.label is not None]
    if not segments:
        raise ValueError(f"{data_name}: no labelled segments to evaluate")
    scorer = load_scorer(model, device=device, precision=precision, threads=threads)
    scores = score_segments(scorer, segments, batch_size=batch_size, progress=progress)
    report = summarize(
        scores,
        threshold=threshold,
        bootstrap=bootstrap,
        confidence=confidence,
        seed=seed,
        model=scorer.name,
        data=data_name,
    )
    if out_dir is not None:
        report = write_report(report, scores, out_dir)
    return report, scores


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm evaluate``."""
    parser.add_argument("data", help="dataset folder (metadata.jsonl), local dataset or Hub id")
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        help="torch checkpoint (directory or .safetensors/.pt) or ONNX file / export directory",
    )
    parser.add_argument("-o", "--out", help="write metrics.json, predictions.csv and PNGs here")
    parser.add_argument("--split", default="train", help="split of a Hub / local dataset")
    parser.add_argument("--limit", type=int, help="evaluate only the first N segments")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)"
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level")
    parser.add_argument("--device", default="auto", help="torch device (torch models)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_evaluate_from_args(args: argparse.Namespace) -> int:
    report, _ = evaluate(
        args.model,
        args.data,
        out_dir=args.out,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        threshold=args.threshold,
        bootstrap=args.bootstrap,
        confidence=args.confidence,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"model: {report.model}\ndata:  {report.data}")
        print(report.format_table())
        if report.files:
            print("files: " + ", ".join(report.files.values()))
    return 0
