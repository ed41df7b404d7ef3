"""Safe reading and writing of a dataset's ``metadata.jsonl`` (and its other JSONL files).

Several writers touch a prepared dataset: ``prepare`` appends rows, ``autolabel`` and the
labelling page rewrite them, and a user may run two of these at once or open two browser
tabs. The rules, used by all of them:

* every change happens under an exclusive advisory lock on ``<folder>/.metadata.lock``
  (:func:`locked`; ``fcntl.flock``, ``msvcrt.locking`` on Windows). The lock is a separate
  file because rewrites replace ``metadata.jsonl`` itself;
* an append is ONE ``write`` of whole lines, then ``fsync``; if it fails (a full disk), the
  file is truncated back to its old length, so no half row is ever left (:func:`append_jsonl`);
* a rewrite goes to a temporary file in the same folder, is ``fsync``-ed and renamed over the
  old file with ``os.replace`` (atomic), then the folder is ``fsync``-ed (:func:`rewrite_jsonl`);
* a reader ignores a last line without its newline (an append interrupted by a crash or a
  power cut), and :func:`repair_tail` removes it before the next append.

Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "append_jsonl",
    "dumps_row",
    "locked",
    "read_jsonl",
    "repair_tail",
    "rewrite_jsonl",
    "row_rev",
]

# The lock file every writer of a dataset folder holds while it changes the folder's JSONL files.
LOCK_NAME = ".metadata.lock"


@contextlib.contextmanager
def locked(
    folder: str | os.PathLike[str], *, name: str = LOCK_NAME, blocking: bool = True
) -> Iterator[None]:
    """Hold the folder's exclusive lock (``folder/name``) for the ``with`` block.

    Args:
        folder: the dataset folder (created if missing).
        name: the lock file's name.
        blocking: wait for the lock; ``False`` raises :class:`BlockingIOError` at once when
            another process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, blocking)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int, blocking: bool) -> None:
        mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
        try:
            msvcrt.locking(fd, mode, 1)
        except OSError as e:
            raise BlockingIOError(str(e)) from e

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fd: int, blocking: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def dumps_row(row: dict[str, Any]) -> str:
    """One JSON object on one line, newline included (UTF-8 kept, no ASCII escaping)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def row_rev(row: dict[str, Any]) -> str:
    """A short content hash of a row (key order ignored): changes whenever the row changes."""
    canonical = json.dumps(row, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("ascii")).hexdigest()[:16]


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, in order (missing file: ``[]``).

    Blank lines are skipped. A last line without its newline that is not valid JSON is an
    interrupted append and is ignored.

    Raises:
        ValueError: a line (other than such a tail) that is not a JSON object; the message
            names the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines):  # the unterminated last line: an interrupted append
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def repair_tail(path: str | os.PathLike[str]) -> int:
    """Remove an unterminated last line (an interrupted append); returns the bytes removed.

    Call it under :func:`locked`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Append rows to a JSONL file with one write, then ``fsync``; returns the rows written.

    All rows land, or none: when the write or the ``fsync`` fails (e.g. ``ENOSPC``), the file
    is truncated back to its previous length before the error is re-raised. Call it under
    :func:`locked` so that no rewrite replaces the file meanwhile.
    """
    rows = list(rows)
    if not rows:
        return 0
    data = "".join(dumps_row(r) for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.fsync(fd)
            raise
    finally:
        os.close(fd)
    return len(rows)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode_of(path: Path) -> int:
    """The permissions a rewritten file keeps: the old file's, else the umask's default."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def rewrite_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL file's content atomically (temporary file, ``fsync``, ``os.replace``).

    Readers see the old file or the new one, never a mix; on failure the old file is intact
    and the temporary file is removed. Call it under :func:`locked`.
    """
    path = Path(path)
    data = "".join(dumps_row(r) for r in rows).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.chmod(tmp, _mode_of(path))
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
