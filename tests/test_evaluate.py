"""Metrics against brute-force references, and the evaluation outputs for torch and ONNX
models."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from smart_turn_mm.metrics import (
    average_precision,
    best_f1_threshold,
    binary_metrics,
    bootstrap_ci,
    paired_bootstrap_ci,
    roc_auc,
)
from smart_turn_mm.synthetic import generate_dataset

PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- metrics


def _auc_pairs(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    pos, neg = s[y == 1], s[y == 0]
    wins = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


def _ap_reference(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision: mean over thresholds at distinct scores of precision x recall step."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        pred = s >= t
        tp = (pred & (y == 1)).sum()
        precision, recall = tp / pred.sum(), tp / (y == 1).sum()
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


def test_auc_and_ap_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        y = rng.integers(0, 2, size=n).astype(float)
        y[:2] = (0, 1)
        s = np.round(rng.random(n), 1)  # many ties
        assert roc_auc(y, s) == pytest.approx(_auc_pairs(y, s))
        assert average_precision(y, s) == pytest.approx(_ap_reference(y, s))


def test_edge_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5
    assert np.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))
    assert np.isnan(average_precision(np.zeros(3), np.array([0.1, 0.2, 0.3])))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="length"):
        roc_auc(np.array([0, 1]), np.array([0.1]))


def test_threshold_metrics_and_best_f1() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.4, 0.6, 0.2, 0.1, 0.55, 0.45])
    m = binary_metrics(y, s, threshold=0.5)
    assert (m.tp, m.fp, m.tn, m.fn) == (3, 1, 3, 1)
    assert m.accuracy == 0.75 and m.precision == 0.75 and m.recall == 0.75 and m.f1 == 0.75
    best, threshold = best_f1_threshold(y, s)
    # brute force over every cut
    f1s = []
    for t in np.r_[s, -1.0]:
        pred = s > t
        tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert best == pytest.approx(max(f1s))
    assert binary_metrics(y, s, threshold).f1 == pytest.approx(best)  # the '>' rule holds
    assert m.to_dict()["roc_auc"] == pytest.approx(_auc_pairs(y, s))


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=200)
    s = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    ci = bootstrap_ci(y, s, n_resamples=300, seed=0)
    point = binary_metrics(y, s)
    for name in ("accuracy", "f1", "roc_auc", "pr_auc"):
        lo, hi = ci[name]
        assert lo <= getattr(point, name) <= hi and hi - lo < 0.3
    assert bootstrap_ci(y, s, n_resamples=300, seed=0) == ci  # seeded
    same = paired_bootstrap_ci(y, s, s, n_resamples=50)
    assert all(v == (0.0, 0.0) for v in same.values())
    better = paired_bootstrap_ci(y, np.where(y == 1, 0.9, 0.1), s, n_resamples=200)
    assert better["roc_auc"][0] > 0 and better["accuracy"][0] > 0


# --------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("data") / "test",
        recordings=4,
        segments_per_recording=3,
        video_seconds=0.4,
        frame_size=48,
        workers=1,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal
    from smart_turn_mm.weights import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(
        SmartTurnMultimodal(ModelConfig.tiny()), tmp_path_factory.mktemp("ckpt") / "model"
    )


def test_evaluate_torch_checkpoint_writes_every_output(folder, checkpoint, tmp_path) -> None:
    from smart_turn_mm.dataset import load_folder
    from smart_turn_mm.evaluate import evaluate

    out = tmp_path / "eval"
    report, scores = evaluate(checkpoint, folder, out_dir=out, bootstrap=50, progress=False)
    segments = load_folder(folder)
    assert report.n == len(segments) == len(scores.labels)
    assert report.with_video == sum(s.video is not None for s in segments)
    # The ablation: without video, a sample without video scores the same; with video differs.
    no_video = ~scores.has_video
    np.testing.assert_allclose(scores.audio_video[no_video], scores.audio_only[no_video])
    assert not np.allclose(scores.audio_video[~no_video], scores.audio_only[~no_video])
    for name in ("metrics.json", "predictions.csv", "roc.png", "pr.png", "confusion.png"):
        assert (out / name).is_file(), name
    for name in ("roc.png", "pr.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == PNG
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ci"]) == {"audio_video", "audio_only"}
    assert {"accuracy", "f1", "roc_auc", "pr_auc"} <= set(metrics["delta_ci"])
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "best_f1_threshold"):
        assert key in metrics["audio_video"] and key in metrics["audio_only"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == report.n
    assert {"id", "label", "p_audio_video", "p_audio_only", "has_video", "cue"} <= set(rows[0])
    assert rows[0]["id"] == segments[0].id
    assert "audio+video" in report.format_table()


def test_evaluate_skips_unlabelled_rows(folder, checkpoint, tmp_path) -> None:
    import dataclasses

    from smart_turn_mm.dataset import load_folder
    from smart_turn_mm.evaluate import evaluate

    segments = load_folder(folder)
    segments[0] = dataclasses.replace(segments[0], label=None)
    report, _ = evaluate(checkpoint, segments, bootstrap=0, progress=False)
    assert report.n == len(segments) - 1


def test_evaluate_onnx_audio_only_model(folder, v32_onnx) -> None:
    """The real Smart Turn v3.2 ONNX from pipecat-ai: audio only, so both modes agree."""
    from smart_turn_mm.evaluate import evaluate

    report, scores = evaluate(v32_onnx, folder, bootstrap=20, progress=False)
    assert report.n == 12 and report.model.endswith(".onnx")
    np.testing.assert_array_equal(scores.audio_video, scores.audio_only)
    assert ((scores.audio_only >= 0) & (scores.audio_only <= 1)).all()


def test_evaluate_command_line(folder, checkpoint, tmp_path, capsys) -> None:
    from smart_turn_mm.evaluate import add_evaluate_arguments, run_evaluate_from_args

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(
        [str(folder), "-m", str(checkpoint), "--bootstrap", "20", "--json", "-o", str(tmp_path)]
    )
    assert run_evaluate_from_args(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 12 and (tmp_path / "predictions.csv").is_file()
    with pytest.raises(FileNotFoundError):
        run_evaluate_from_args(parser.parse_args([str(folder), "-m", str(tmp_path / "none")]))


@pytest.mark.slow
def test_evaluate_exported_onnx_matches_torch(folder, checkpoint, tmp_path) -> None:
    from smart_turn_mm.evaluate import evaluate
    from smart_turn_mm.export import export_onnx

    export_onnx(checkpoint, tmp_path / "onnx", quantize=False)
    _, torch_scores = evaluate(checkpoint, folder, bootstrap=0, progress=False)
    _, onnx_scores = evaluate(
        tmp_path / "onnx" / "smart-turn-multimodal-gpu.onnx", folder, bootstrap=0, progress=False
    )
    np.testing.assert_allclose(onnx_scores.audio_video, torch_scores.audio_video, atol=1e-4)
    np.testing.assert_allclose(onnx_scores.audio_only, torch_scores.audio_only, atol=1e-4)
