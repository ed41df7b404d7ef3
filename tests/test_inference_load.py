"""Load: 1,000 predict_endpoint calls with video keep memory flat (slow: run with -m slow)."""

from __future__ import annotations

import numpy as np
import pytest
from signals import speech_like
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.inference import load_model, predict_endpoint


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@pytest.mark.slow
def test_memory_flat_over_1000_calls(tmp_path_factory):
    model = load_model(tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm"))
    audio = speech_like(2.0, seed=1)
    frames = np.random.default_rng(0).integers(0, 255, (12, 48, 64, 3), dtype=np.uint8)
    for _ in range(100):  # warm up allocator pools and caches
        predict_endpoint(audio, frames, model=model)
    start = _rss_mb()
    for _ in range(900):
        result = predict_endpoint(audio, frames, model=model, face_crop=False)
        assert result.used_video
    grown = _rss_mb() - start
    print(f"RSS after 100 calls {start:.1f} MB, after 1000 {start + grown:.1f} MB")
    assert grown < 20.0, f"RSS grew by {grown:.1f} MB over 900 calls"
