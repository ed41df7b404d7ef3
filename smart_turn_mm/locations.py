"""Where files live: the cache directory, files shipped inside other installed packages, file
digests, and atomic writes.

Torch-free, so the inference path can use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "cache_dir",
    "file_mode",
    "find_smart_turn_v3_onnx",
    "packaged_file",
    "sha256_file",
]

# Where the real trained Smart Turn v3.2 model ships inside the ``pipecat-ai`` wheel.
PIPECAT_V3_ONNX = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")


def file_mode() -> int:
    """Permissions for a new file under the current umask (``mkstemp`` gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write to: renamed onto ``path`` (``os.replace``)
    when the block ends, removed when it raises. Readers never see a partial file.

    ``suffix``: the temporary name's ending (e.g. ``.mp4`` for writers that choose the
    format from it). The file gets ordinary permissions under the umask.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, file_mode())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
