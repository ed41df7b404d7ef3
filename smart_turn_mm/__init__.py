"""smart-turn-mm: audio-visual end-of-turn detection for voice AI.

Public names are imported lazily, so ``import smart_turn_mm`` costs nothing and the inference
names never pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "predict_endpoint": "smart_turn_mm.inference",
    "whisper_features": "smart_turn_mm.audio",
    "load_audio": "smart_turn_mm.audio",
    "video_tensor": "smart_turn_mm.video",
    "prepare_video": "smart_turn_mm.video",
    "TurnDetector": "smart_turn_mm.realtime",
    "ModelConfig": "smart_turn_mm.model",
    "SmartTurnMultimodal": "smart_turn_mm.model",
    "load_pretrained": "smart_turn_mm.weights",
    "save_pretrained": "smart_turn_mm.weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smart_turn_mm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
