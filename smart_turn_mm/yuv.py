"""Planar 8-bit YUV frames as numpy: the formats the face crop takes as they are decoded.

Only numpy is imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["YUV_SUBSAMPLING", "plane_array"]

# Planar 8-bit YUV formats: log2 of their chroma subsampling (horizontal, vertical).
YUV_SUBSAMPLING = {
    "yuv420p": (1, 1),
    "yuvj420p": (1, 1),
    "yuv422p": (1, 0),
    "yuvj422p": (1, 0),
    "yuv444p": (0, 0),
    "yuvj444p": (0, 0),
}


def plane_array(plane: Any) -> np.ndarray:
    """One plane of a PyAV frame as a (height, width) uint8 view (no copy)."""
    stride = plane.line_size
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, abs(stride))
    return (rows[::-1] if stride < 0 else rows)[:, : plane.width]
