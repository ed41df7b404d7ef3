"""Where files live: the cache directory and model files shipped inside other packages.

Torch-free, so the inference path can use it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "find_smart_turn_v3_onnx"]

# Where the real trained Smart Turn v3.2 model ships inside the ``pipecat-ai`` wheel.
PIPECAT_V3_ONNX = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/smart_turn_mm`` (default ``~/.cache/smart_turn_mm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smart_turn_mm"


def find_smart_turn_v3_onnx() -> Path | None:
    """The Smart Turn v3.2 ONNX shipped in the installed ``pipecat-ai`` package, if any.

    Found without importing pipecat (its import is slow and logs a banner).
    """
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*PIPECAT_V3_ONNX)
        if candidate.is_file():
            return candidate
    return None
