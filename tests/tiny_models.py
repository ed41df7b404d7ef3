"""A tiny multimodal ONNX export (with its split files), made once per test session."""

from __future__ import annotations

import threading
from pathlib import Path

_LOCK = threading.Lock()
STEM = "smart-turn-multimodal-gpu"


def tiny_multimodal_onnx(folder: Path) -> Path:
    """Export a seeded ``SmartTurnMultimodal(ModelConfig.tiny())`` to ``folder`` (fp32 + split
    files) unless it is already there; returns the combined file."""
    path = folder / f"{STEM}.onnx"
    with _LOCK:
        if not all(
            (folder / f"{STEM}{suffix}").is_file()
            for suffix in (".onnx", ".audio.onnx", ".video.onnx", ".head.onnx")
        ):
            import torch

            from smart_turn_mm.export import export_onnx
            from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal

            torch.manual_seed(0)
            model = SmartTurnMultimodal(ModelConfig.tiny()).eval()
            report = export_onnx(model, folder, quantize=False)
            assert report.passed, report.to_markdown()
    return path
