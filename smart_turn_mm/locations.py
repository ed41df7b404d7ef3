"""Where files live: the cache directory, files shipped inside other installed packages, and
file digests.

Torch-free, so the inference path can use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "find_smart_turn_v3_onnx", "packaged_file", "sha256_file"]

# Where the real trained Smart Turn v3.2 model ships inside the ``pipecat-ai`` wheel.
PIPECAT_V3_ONNX = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/smart_turn_mm`` (default ``~/.cache/smart_turn_mm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smart_turn_mm"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_file(package: str, parts: tuple[str, ...]) -> Path | None:
    """``package/<parts...>`` inside an installed package, found without importing it (the
    packages that carry model files import heavy things, or log banners)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


def find_smart_turn_v3_onnx() -> Path | None:
    """The Smart Turn v3.2 ONNX shipped in the installed ``pipecat-ai`` package, if any."""
    return packaged_file("pipecat", PIPECAT_V3_ONNX)
