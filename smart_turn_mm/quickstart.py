"""The offline quickstart: the whole pipeline on a small synthetic dataset, in minutes on a CPU.

1. generate a synthetic audio-visual dataset (:mod:`smart_turn_mm.synthetic`): a training
   folder and a test folder of other recordings;
2. train a small model through both stages (:func:`smart_turn_mm.train.train`), validating on a
   split of the training folder made by recording;
3. evaluate the trained checkpoint on the held-out test folder
   (:func:`smart_turn_mm.evaluate.evaluate`): audio+video against audio-only, bootstrap
   intervals, per-sample CSV and plots;
4. export fp32 and int8 ONNX, validated (:func:`smart_turn_mm.export.export_onnx`, calibrated
   on the training folder);
5. predict on a held-out clip with the int8 file (:func:`smart_turn_mm.predict_endpoint`).

The model: the published audio branch started from the real Smart Turn v3.2 weights shipped in
the ``pipecat-ai`` wheel (``tiny-video`` preset) with a tiny video branch, when that wheel is
installed; otherwise the ``tiny`` preset from random weights, whose stage 2 then needs a higher
learning rate to learn the audio cues from scratch.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuickstartResult", "add_arguments", "run", "run_quickstart"]


@dataclass(frozen=True)
class QuickstartResult:
    """Where everything went and the headline numbers."""

    out_dir: Path
    train_dir: Path
    test_dir: Path
    run_dir: Path
    export_dir: Path | None
    test_metrics: dict[str, Any]  # EvaluationReport.to_dict() on the test folder
    per_cue: dict[str, dict[str, float]]  # cue -> accuracy with / without video
    predictions: list[dict[str, Any]]
    train_samples_per_s: float
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def audio_video_beats_audio_only(self) -> bool:
        av, ao = self.test_metrics["audio_video"], self.test_metrics["audio_only"]
        return bool(av["f1"] > ao["f1"] and av["roc_auc"] > ao["roc_auc"])


def _per_cue(scores: Any) -> dict[str, dict[str, float]]:
    cues = np.array([str(s.fields.get("cue", "")) for s in scores.segments])
    out = {}
    for cue in ("audio", "video", "both"):
        m = cues == cue
        if m.any():
            y = scores.labels[m]
            out[cue] = {
                "n": int(m.sum()),
                "audio_video_accuracy": float(((scores.audio_video[m] > 0.5) == y).mean()),
                "audio_only_accuracy": float(((scores.audio_only[m] > 0.5) == y).mean()),
            }
    return out


def run_quickstart(
    out_dir: str | os.PathLike = "quickstart",
    *,
    recordings: int = 80,
    test_recordings: int = 32,
    segments_per_recording: int = 4,
    seed: int = 0,
    stage1_epochs: float | None = None,
    stage2_steps: int | None = None,
    batch_size: int = 16,
    bootstrap: int = 1000,
    export: bool = True,
    smart_turn_audio: bool | None = None,
    workers: int | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> QuickstartResult:
    """Generate, train (both stages), evaluate, export and predict; print each step.

    Args:
        out_dir: everything goes here (``data/train``, ``data/test``, ``run``, ``export``).
        recordings, test_recordings: synthetic recordings in each folder.
        segments_per_recording: segments cut from each recording.
        seed: seeds the data and the run.
        stage1_epochs, stage2_steps: override the quickstart's schedule.
        batch_size: training batch size.
        bootstrap: bootstrap resamples for the intervals.
        export: run the ONNX export (and predict with it; else predict with the checkpoint).
        smart_turn_audio: start the audio branch from the Smart Turn v3.2 file in pipecat-ai
            (default: when it is installed).
        workers: processes that write the synthetic data (default: CPU count).
        progress: show progress bars.
        echo: where the step messages go.
    """
    from smart_turn_mm.evaluate import evaluate
    from smart_turn_mm.locations import find_smart_turn_v3_onnx
    from smart_turn_mm.synthetic import generate_dataset
    from smart_turn_mm.train import TrainConfig, train

    out = Path(out_dir)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(n: int, title: str) -> float:
        echo(f"\n[{n}/5] {title}")
        return time.perf_counter()

    # 1. data
    t = step(1, "generate a synthetic audio-visual dataset (WAV + H.264 face clips)")
    train_dir = generate_dataset(
        out / "data" / "train",
        recordings=recordings,
        segments_per_recording=segments_per_recording,
        seed=seed,
        prefix="rec",
        workers=workers,
    )
    test_dir = generate_dataset(
        out / "data" / "test",
        recordings=test_recordings,
        segments_per_recording=segments_per_recording,
        seed=seed + 1,
        prefix="test",
        workers=workers,
    )
    timings["generate"] = time.perf_counter() - t
    echo(
        f"  {recordings * segments_per_recording} training segments ({recordings} recordings) "
        f"in {train_dir}\n  {test_recordings * segments_per_recording} test segments "
        f"({test_recordings} other recordings) in {test_dir}\n  ({timings['generate']:.0f} s)"
    )

    # 2. train
    v3 = find_smart_turn_v3_onnx()
    if smart_turn_audio and v3 is None:
        raise FileNotFoundError("smart_turn_audio=True needs pipecat-ai (pip install pipecat-ai)")
    if v3 is not None and smart_turn_audio is not False:
        model, audio_init, stage2_lr = "tiny-video", "smart-turn", 1e-5
        s1, s2_epochs, s2 = 12.0, 1.0, 3  # stage 2: a few steps at the recipe's lr
        echo(f"  audio branch: Smart Turn v3.2 weights from {v3}")
    else:
        model, audio_init, stage2_lr = "tiny", "random", 1e-3
        s1, s2_epochs, s2 = 12.0, 8.0, None  # the audio branch learns from scratch
        echo("  audio branch: random (pip install pipecat-ai to start from Smart Turn v3.2)")
    config = TrainConfig(
        data_dir=str(train_dir),
        model=model,
        audio_init=audio_init,
        video_init="random",
        output_dir=str(out / "run"),
        eval_fraction=0.1,
        batch_size=batch_size,
        stage1_epochs=stage1_epochs if stage1_epochs is not None else s1,
        stage2_epochs=s2_epochs,
        stage2_max_steps=stage2_steps if stage2_steps is not None else s2,
        stage2_lr=stage2_lr,
        seed=seed,
        num_workers=0,
        cache_decoded=True,
        color_jitter=True,
        bootstrap=bootstrap,
        save_every_steps=50,
        progress=progress,
    )
    t = step(2, f"train '{model}' through both stages ({out / 'run'})")
    result = train(config)
    timings["train"] = time.perf_counter() - t
    echo(
        f"  {result.global_step} steps, {result.samples_per_s:.1f} training samples/s, "
        f"{timings['train']:.0f} s"
    )

    # 3. evaluate on the held-out test folder
    t = step(3, "evaluate on the held-out test folder (recordings never seen in training)")
    report, scores = evaluate(
        result.model_dir,
        test_dir,
        out_dir=out / "eval",
        bootstrap=bootstrap,
        seed=seed,
        progress=progress,
    )
    timings["evaluate"] = time.perf_counter() - t
    per_cue = _per_cue(scores)
    echo(report.format_table())
    echo("  accuracy by which modality tells the ending:")
    for cue, numbers in per_cue.items():
        av_acc, ao_acc = numbers["audio_video_accuracy"], numbers["audio_only_accuracy"]
        echo(
            f"    {cue:>5} cue ({numbers['n']:3d} segments): audio+video {av_acc:.3f}, "
            f"audio only {ao_acc:.3f}"
        )
    echo(f"  files: {out / 'eval'} ({timings['evaluate']:.0f} s)")

    # 4. export
    export_dir: Path | None = None
    model_file: Path = result.model_dir
    if export:
        t = step(4, "export fp32 and int8 ONNX, validated against torch")
        export_dir, model_file = _export(result.model_dir, train_dir, out / "export", echo)
        timings["export"] = time.perf_counter() - t
        echo(f"  ({timings['export']:.0f} s)")
    else:
        echo("\n[4/5] export: skipped")

    # 5. predict on a held-out clip
    t = step(5, "predict held-out clips (smart_turn_mm.predict_endpoint)")
    predictions = _predict(scores, model_file, echo)
    timings["predict"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    av, ao = report.audio_video, report.audio_only
    echo(
        f"\nheld-out test: audio+video F1 {av.f1:.3f} / ROC-AUC {av.roc_auc:.3f} vs audio-only "
        f"F1 {ao.f1:.3f} / ROC-AUC {ao.roc_auc:.3f}"
    )
    echo(
        "time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        + f"; total {timings['total'] / 60:.1f} min"
    )
    return QuickstartResult(
        out_dir=out,
        train_dir=train_dir,
        test_dir=test_dir,
        run_dir=result.output_dir,
        export_dir=export_dir,
        test_metrics=report.to_dict(),
        per_cue=per_cue,
        predictions=predictions,
        train_samples_per_s=result.samples_per_s,
        timings_s=timings,
    )


def _export(
    model_dir: Path, train_dir: Path, out: Path, echo: Callable[[str], None]
) -> tuple[Path, Path]:
    """Export and report; returns (export dir, the file to predict with)."""
    from smart_turn_mm.export import CalibrationData, ExportValidationError, export_onnx

    try:
        report = export_onnx(model_dir, out, calibration=CalibrationData.from_dataset(train_dir))
    except ExportValidationError as e:
        echo(f"  export validation FAILED: {e}")
        fp32 = sorted(out.glob("*-gpu.onnx"))
        return out, fp32[0] if fp32 else model_dir
    for name, info in report.files.items():
        if info.get("part") == "combined":
            echo(f"  {name}: {info['precision']}, {info['bytes'] / 1e6:.2f} MB")
    for check in ("torch_vs_fp32", "int8_vs_fp32"):
        for mode, stats in report.validation.get(check, {}).items():
            if stats.get("count"):
                echo(
                    f"  {check} ({mode}, {stats['count']} samples): max |dp| "
                    f"{stats['max_abs_dp']:.2g}, decisions agree {stats['agreement']:.1%}"
                )
    echo(f"  validation: {report.status}; report: {out / 'export-report.md'}")
    int8 = [out / n for n, i in report.files.items() if i.get("precision") == "int8"]
    int8 = [p for p in int8 if report.files[p.name].get("part") == "combined"]
    fp32 = [out / n for n, i in report.files.items() if i.get("part") == "combined"]
    return out, (int8 or fp32)[0]


def _predict(scores: Any, model_file: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Predict the first held-out complete and incomplete turns whose ending only the face
    tells, with and without their video."""
    segments = scores.segments
    picks = [
        s
        for label in (True, False)
        for s in [
            next(
                (s for s in segments if s.fields.get("cue") == "video" and s.label is label),
                None,
            )
        ]
        if s is not None
    ] or [next((s for s in segments if s.video), segments[0])]
    out = []
    for pick in picks:
        truth = "complete" if pick.label else "incomplete"
        echo(f"  clip {pick.id} (only the face tells the ending): the turn is {truth}")
        if model_file.suffix == ".onnx":
            from smart_turn_mm.inference import predict_endpoint

            with_video = predict_endpoint(pick.audio, pick.video, model=model_file, face_crop=False)
            audio_only = predict_endpoint(pick.audio, None, model=model_file)
            p_av, p_a = with_video.probability, audio_only.probability
        else:  # no export: the torch checkpoint's scores
            i = segments.index(pick)
            p_av, p_a = float(scores.audio_video[i]), float(scores.audio_only[i])
        for name, p in (("audio+video", p_av), ("audio only", p_a)):
            verdict = "complete" if p > 0.5 else "incomplete"
            echo(f"    {name:>11}: P(complete) = {p:.3f} -> {verdict}")
        out.append(
            {"id": pick.id, "label": bool(pick.label), "audio_video": p_av, "audio_only": p_a}
        )
    echo(f"  model: {model_file}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm quickstart``."""
    parser.add_argument("--out", default="quickstart", help="output directory")
    parser.add_argument("--recordings", type=int, default=80, help="training recordings")
    parser.add_argument("--test-recordings", type=int, default=32, help="test recordings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def run(args: argparse.Namespace) -> int:
    result = run_quickstart(
        args.out,
        recordings=args.recordings,
        test_recordings=args.test_recordings,
        seed=args.seed,
        export=not args.no_export,
        progress=args.progress,
    )
    if not result.audio_video_beats_audio_only:
        print("\nunexpected: audio+video did not beat audio-only on the held-out test folder")
        return 1
    return 0
