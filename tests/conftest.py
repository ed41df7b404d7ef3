"""Shared fixtures: tiny models built in code, the real Smart Turn v3.2 file from pipecat-ai."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def v32_onnx() -> Path:
    """The real trained Smart Turn v3.2 int8 ONNX shipped in the pipecat-ai wheel (a dev dep)."""
    from smart_turn_mm.weights import find_smart_turn_v3_onnx

    path = find_smart_turn_v3_onnx()
    assert path is not None, "pipecat-ai (a dev dependency) must be installed for these tests"
    return path


@pytest.fixture()
def tiny_model():
    import torch

    from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal

    torch.manual_seed(0)
    return SmartTurnMultimodal(ModelConfig.tiny()).eval()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A synthetic SPEC 5 folder: 6 recordings x 3 segments, small clips (read-only: tests
    that edit it work on a copy)."""
    from smart_turn_mm.synthetic import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("data") / "train",
        recordings=6,
        segments_per_recording=3,
        video_seconds=0.4,
        frame_size=48,
        workers=1,
    )
