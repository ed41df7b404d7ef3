"""Decoded frames held as numpy YUV planes, in buffers reused from call to call.

Keeping 32 decoded ``av.VideoFrame`` objects alive makes FFmpeg's frame pool allocate 32
fresh buffers on every call, and the kernel then zero-fills them page by page: about 3,200
page faults and 10 ms for the tail of a 640x480 clip on this project's 2-core machine, a
quarter of the whole video front end. :class:`FrameRing` instead copies each kept frame's
planes (0.05 ms at 640x480) into a buffer that the next call reuses, and lets FFmpeg recycle
its own buffers at once.

Only numpy is imported here; PyAV is imported lazily.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["YUV_SUBSAMPLING", "FrameRing", "YUVFrame", "plane_array"]

# Planar 8-bit YUV formats: log2 of their chroma subsampling (horizontal, vertical).
YUV_SUBSAMPLING = {
    "yuv420p": (1, 1),
    "yuvj420p": (1, 1),
    "yuv422p": (1, 0),
    "yuvj422p": (1, 0),
    "yuv444p": (0, 0),
    "yuvj444p": (0, 0),
}

# A released ring is kept for the next call only up to this size (32 frames of 640x480:
# 14.7 MB; of 1920x1080: 100 MB, not kept).
MAX_IDLE_BYTES = 64 << 20


def plane_array(plane: Any) -> np.ndarray:
    """One plane of a PyAV frame as a (height, width) uint8 view (no copy)."""
    stride = plane.line_size
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, abs(stride))
    return (rows[::-1] if stride < 0 else rows)[:, : plane.width]


@dataclass(frozen=True, eq=False)
class YUVFrame:
    """A planar 8-bit YUV frame as numpy planes (views into a :class:`FrameRing`).

    Attributes:
        planes: Y, U, V as (height, width) uint8 arrays (chroma subsampled per ``format``).
        format: the pixel format name, a key of :data:`YUV_SUBSAMPLING`.
        colorspace: the decoded frame's colour matrix (PyAV's ``VideoFrame.colorspace``).
        width, height: the luma plane's size.
        pts: the presentation timestamp (stream time base), or ``None``.
    """

    planes: tuple[np.ndarray, ...]
    format: str
    colorspace: Any
    width: int
    height: int
    pts: int | None

    def to_av(self) -> Any:
        """A new ``av.VideoFrame`` with these pixels and colour matrix."""
        import av

        frame = av.VideoFrame(self.width, self.height, self.format)
        for plane, src in zip(frame.planes, self.planes, strict=True):
            plane_array(plane)[...] = src
        frame.colorspace = self.colorspace
        frame.pts = self.pts
        return frame

    def to_ndarray(self, format: str = "rgb24", **kwargs: Any) -> np.ndarray:
        """The frame converted as ``av.VideoFrame.to_ndarray`` converts the decoded frame."""
        return self.to_av().to_ndarray(format=format, **kwargs)


class FrameRing:
    """``slots`` frame buffers of one size and format, filled round-robin.

    :meth:`keep` copies a decoded frame into the next slot and returns a :class:`YUVFrame`
    viewing it; a slot is overwritten ``slots`` calls later, so a caller that keeps at most
    ``slots - 1`` frames at a time never sees its frames change. Frames of another size or
    format are returned as they are. :meth:`release` hands the buffers to the next
    :meth:`acquire` of the same shape: the frames must not be used after it.
    """

    _idle: FrameRing | None = None
    _lock = threading.Lock()

    def __init__(self, key: tuple[str, int, int, int]) -> None:
        name, width, height, slots = key
        sx, sy = YUV_SUBSAMPLING[name]
        chroma = (-(-height >> sy), -(-width >> sx))  # ceil
        self.key = key
        self._buffers = [np.empty((slots, *shape), np.uint8) for shape in [(height, width)]]
        self._buffers += [np.empty((slots, *chroma), np.uint8) for _ in range(2)]
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    @classmethod
    def acquire(cls, frame: Any, slots: int) -> FrameRing | None:
        """A ring for frames like ``frame`` (an ``av.VideoFrame``), or ``None`` when its
        format is not planar 8-bit YUV."""
        name = frame.format.name
        if name not in YUV_SUBSAMPLING:
            return None
        key = (name, frame.width, frame.height, slots)
        with cls._lock:
            idle = cls._idle
            if idle is not None and idle.key == key:
                cls._idle = None
                return idle
        return cls(key)

    def keep(self, frame: Any) -> Any:
        """A :class:`YUVFrame` copy of ``frame`` in the next slot (or ``frame`` itself when it
        does not fit this ring)."""
        name, width, height, slots = self.key
        if frame.format.name != name or frame.width != width or frame.height != height:
            return frame
        i = self._next
        self._next = (i + 1) % slots
        planes = []
        for plane, buffer in zip(frame.planes, self._buffers, strict=True):
            src = plane_array(plane)
            dst = buffer[i, : src.shape[0], : src.shape[1]]
            dst[...] = src
            planes.append(dst)
        return YUVFrame(tuple(planes), name, frame.colorspace, width, height, frame.pts)

    def release(self) -> None:
        """Offer the buffers to the next call (kept if small enough)."""
        if self.nbytes <= MAX_IDLE_BYTES:
            with FrameRing._lock:
                FrameRing._idle = self
