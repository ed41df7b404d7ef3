"""Test media made on the fly: a real face on a moving background, frames that carry their
index, and video files written with PyAV (H.264 in MP4 by default)."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# skimage.data.astronaut() (512 x 512): the face's detected box is about x 178-268, y 63-176.
ASTRONAUT_FACE_XYWH = (178.17, 62.91, 89.90, 113.33)
# The region pasted by face_frames (rows, columns of the astronaut photo), face included.
_FACE_REGION = (slice(20, 240), slice(130, 320))

# Frame index code: INDEX_BITS black/white 16 x 16 blocks in the top-left corner.
INDEX_BITS = 10
_BLOCK = 16


@functools.cache
def astronaut() -> np.ndarray:
    """``skimage.data.astronaut()``, uint8 (512, 512, 3) RGB (a real face photo, public domain).

    Read from scikit-image's PNG with PyAV (same pixels), skipping the slow skimage import.
    """
    spec = importlib.util.find_spec("skimage")
    png = Path(spec.submodule_search_locations[0]) / "data" / "astronaut.png" if spec else None
    if png is None or not png.is_file():
        from skimage import data

        return data.astronaut()
    with av.open(str(png)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    image.flags.writeable = False
    return image


def face_patch(scale: float = 1.0) -> np.ndarray:
    """The astronaut's head and shoulders, optionally rescaled, uint8 RGB."""
    patch = astronaut()[_FACE_REGION]
    if scale != 1.0:
        h, w = round(patch.shape[0] * scale), round(patch.shape[1] * scale)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(patch), format="rgb24")
        patch = frame.reformat(width=w, height=h, interpolation="AREA").to_ndarray()
    return patch


def stamp_index(frame: np.ndarray, index: int) -> None:
    """Write ``index`` into the frame's top-left corner as black/white blocks (in place)."""
    for bit in range(INDEX_BITS):
        value = 255 if (index >> bit) & 1 else 0
        frame[:_BLOCK, bit * _BLOCK : (bit + 1) * _BLOCK] = value


def read_index(frame: np.ndarray) -> int:
    """The index written by :func:`stamp_index` (robust to lossy compression)."""
    index = 0
    for bit in range(INDEX_BITS):
        block = frame[2 : _BLOCK - 2, bit * _BLOCK + 2 : (bit + 1) * _BLOCK - 2]
        if block.mean() > 128:
            index |= 1 << bit
    return index


def face_frames(
    n: int, height: int = 240, width: int = 320, *, face: bool = True, scale: float = 0.5
) -> list[np.ndarray]:
    """``n`` RGB frames: a moving gradient background, the astronaut's face drifting right,
    and the frame index stamped in the top-left corner."""
    patch = face_patch(scale) if face else None
    background = np.empty((height, width, 3), dtype=np.uint8)
    background[..., 0] = np.arange(width, dtype=np.uint8)[None, :]  # wraps at 256
    background[..., 1] = (2 * np.arange(height, dtype=np.uint8))[:, None]
    background[..., 2] = 90
    frames = []
    for i in range(n):
        frame = background.copy()
        frame[..., 0] += np.uint8(3 * i % 256)
        if patch is not None:
            ph, pw = patch.shape[:2]
            x0 = (width - pw) // 2 + (i % 20) - 10
            y0 = max(height - ph - 4, _BLOCK + 4)
            frame[y0 : y0 + ph, x0 : x0 + pw] = patch[: height - y0, : width - x0]
        stamp_index(frame, i)
        frames.append(frame)
    return frames


def write_test_video(
    path: str | os.PathLike[str],
    frames: Sequence[np.ndarray],
    fps: int = 30,
    codec: str = "libx264",
    *,
    gop_size: int | None = None,
    audio: bool = False,
    slices: int | None = None,
) -> None:
    """Write RGB frames (even sizes) to ``path``; optionally with a 440 Hz AAC track.

    ``slices``: H.264 slices per frame (default: whatever libx264's sliced threads give)."""
    height, width = frames[0].shape[:2]
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
            if slices is not None:
                stream.codec_context.thread_type = "FRAME"  # no sliced threads
                stream.options = {**stream.options, "x264-params": f"slices={slices}"}
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        astream = container.add_stream("aac", rate=16000) if audio else None
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            _write_tone(container, astream, len(frames) / fps)


def write_audio_only(
    path: str | os.PathLike[str], seconds: float = 1.0, *, cover_art: bool = False
) -> None:
    """An audio file with no video stream: AAC in MP4 (``.m4a``), or with ``cover_art`` an
    MP3 whose only video stream is an attached JPEG picture."""
    with av.open(os.fspath(path), mode="w") as container:
        if not cover_art:
            _write_tone(container, container.add_stream("aac", rate=16000), seconds)
            return
        audio = container.add_stream("mp3", rate=16000)
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24")
        for packet in [*cover.encode(picture.reformat(format="yuvj420p")), *cover.encode()]:
            container.mux(packet)
        _write_tone(container, audio, seconds)


def _write_tone(container, stream, seconds: float) -> None:
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    chunk = 1024
    for start in range(0, len(samples), chunk):
        block = samples[start : start + chunk][None, :]
        frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
