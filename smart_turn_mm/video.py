"""The video front end (SPEC 2): a file or RGB frames -> float32 (3, 32, 112, 112).

Pipeline, the same for training and inference:

1. the LAST :data:`NUM_FRAMES` frames at the source frame rate (:func:`read_last_frames`
   seeks near the end of long files instead of decoding them whole);
2. one square face box for the clip (:func:`smart_turn_mm.face.clip_face_box`), or the
   largest centred square when no face is found or ``face_crop=False``;
3. crop and resize to :data:`FRAME_SIZE` (:func:`smart_turn_mm.face.crop_frames`);
4. :func:`pad_frames`: fewer than :data:`NUM_FRAMES` frames -> the last frame repeated;
5. :func:`normalize_clip`: [0, 1], Kinetics-400 mean/std, (C, T, H, W) layout.

Only numpy and PyAV (imported lazily) are used here; face detection uses ONNX Runtime.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .face import FaceBox, FaceDetector, center_box, clip_face_box, crop_frames, sws_options

__all__ = [
    "FRAME_SIZE",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "NUM_FRAMES",
    "VideoClip",
    "normalize_clip",
    "pad_frames",
    "prepare_video",
    "read_last_frames",
    "video_tensor",
]

# The model sees the last 32 frames (about 1.07 s at 30 fps), 112 x 112 pixels each.
NUM_FRAMES = 32
FRAME_SIZE = 112
# Kinetics-400 RGB statistics on [0, 1] pixels (R3D-18's pre-training).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

# uint8 value -> normalised float32, per channel: (3, 256).
_NORM_LUT = (
    (np.arange(256, dtype=np.float64)[None, :] / 255.0 - np.asarray(KINETICS_MEAN)[:, None])
    / np.asarray(KINETICS_STD)[:, None]
).astype(np.float32)

# Extra frames decoded before the wanted tail of a long file, for variable frame rates.
_SEEK_MARGIN_FRAMES = 16


# --------------------------------------------------------------------------- decoding


@dataclass
class _Tail:
    frames: list[Any]  # av.VideoFrame, the last ones in presentation order
    fps: float | None
    num_decoded: int  # frames the decoder output (skipped frames are not counted)
    seeked: bool  # whether the fast path (seek near the end) gave the result


def _window_start(stream: Any, num_frames: int) -> int | None:
    """The pts (stream time base) before which frames cannot be among the last ones."""
    rate = stream.average_rate or stream.guessed_rate
    time_base = stream.time_base
    duration = stream.duration
    if not rate or not time_base:
        return None
    if duration is None and stream.container.duration is not None:
        duration = int(Fraction(stream.container.duration, 1_000_000) / time_base)
    if not duration:
        return None
    start = stream.start_time or 0
    window = Fraction(num_frames + _SEEK_MARGIN_FRAMES) / Fraction(rate) / time_base
    return int(start + duration - window)


def _is_cover_art(stream: Any) -> bool:
    """Whether a video stream is an attached picture (an audio file's cover art)."""
    import av

    flag = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    return flag is not None and bool(stream.disposition & flag)


def _decode(path: str, num_frames: int, fast: bool) -> _Tail:
    """Decode ``path`` keeping its last ``num_frames`` frames.

    ``fast``: seek to the keyframe before the window and, before the window, let the decoder
    skip frames that no other frame references (``skip_frame = NONREF``); the frames in the
    window are decoded exactly as a full decode gives them. The caller checks the result.
    """
    import av

    try:
        container = av.open(path, mode="r")
    except av.error.FFmpegError as e:
        if isinstance(e, OSError):
            raise
        raise ValueError(f"cannot read video file {path}: {e}") from e
    with container:
        streams = [s for s in container.streams.video if not _is_cover_art(s)]
        if not streams:
            raise ValueError(f"{path} has no video stream")
        stream = streams[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        threshold = _window_start(stream, num_frames) if fast else None
        if threshold is not None and threshold <= (stream.start_time or 0):
            threshold = None  # the whole file is within the window
        seeked = False
        if threshold is not None:
            try:
                container.seek(threshold, stream=stream, backward=True, any_frame=False)
                seeked = True
            except av.error.FFmpegError:
                threshold = None  # not seekable: decode from the start, no skipping
        codec = stream.codec_context
        tail: deque[Any] = deque(maxlen=num_frames)
        num_decoded = 0
        first_pts = None
        try:
            for packet in container.demux(stream):
                if threshold is not None:
                    before = packet.pts is not None and packet.pts < threshold
                    codec.skip_frame = "NONREF" if before else "DEFAULT"
                for frame in codec.decode(packet):
                    if num_decoded == 0:
                        first_pts = frame.pts
                    num_decoded += 1
                    tail.append(frame)
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode video file {path}: {e}") from e
    if threshold is not None:
        # The tail is exact when decoding started at or before the window and every kept
        # frame lies at or after it (frames before it may have been skipped).
        exact = (
            len(tail) == num_frames
            and first_pts is not None
            and first_pts <= threshold
            and all(f.pts is not None and f.pts >= threshold for f in tail)
        )
        if not exact:
            return _decode(path, num_frames, fast=False)
    return _Tail(list(tail), fps, num_decoded, seeked)


def _decode_tail(path: str | os.PathLike[str], num_frames: int) -> _Tail:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    tail = _decode(path, num_frames, fast=True)
    if not tail.frames:
        raise ValueError(f"no decodable video frames in {path}")
    return tail


def read_last_frames(
    path: str | os.PathLike[str], num_frames: int = NUM_FRAMES
) -> tuple[list[np.ndarray], float | None]:
    """The last ``num_frames`` frames of a video file, as RGB, and its frame rate.

    A long file is not decoded whole: the reader seeks to the keyframe before the last
    ``num_frames`` (+16) frames and decodes forward from there, and falls back to decoding
    from the start when the container's duration or index cannot be trusted.

    Returns:
        (frames, fps): up to ``num_frames`` uint8 (H, W, 3) RGB frames in presentation order
        (fewer when the file is shorter); fps is the stream's average frame rate (``None``
        when the container does not give one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable video (corrupt, truncated, no frames, no video stream: an
            audio file's cover art does not count as video).
    """
    tail = _decode_tail(path, num_frames)
    return list(_RGBFrames(tail.frames)), tail.fps


class _RGBFrames(Sequence[np.ndarray]):
    """Decoded frames seen as (H, W, 3) uint8 RGB arrays, converted on access.

    ``prepare_video`` crops one frame at a time from this, so the clip never holds 32
    full-size RGB copies at once (fresh memory costs page faults: about 20% of the time).
    """

    def __init__(self, frames: list[Any]) -> None:
        self._frames = frames
        self._options = sws_options()

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _RGBFrames(self._frames[index])
        return self._frames[index].to_ndarray(format="rgb24", **self._options)


# --------------------------------------------------------------------------- tensors


def pad_frames(frames: Sequence[Any] | np.ndarray, num_frames: int = NUM_FRAMES) -> Any:
    """THE padding rule, for training and inference alike.

    More than ``num_frames`` frames -> the last ``num_frames``; fewer -> the LAST frame is
    repeated at the end until there are ``num_frames``. Never zero frames.

    Args:
        frames: a list of frames or an array whose first axis is time.

    Returns:
        the same kind as ``frames`` (list or array), of length ``num_frames``.
    """
    if len(frames) == 0:
        raise ValueError("cannot pad an empty clip: at least one frame is needed")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(frames, np.ndarray):
        if len(frames) >= num_frames:
            return frames[len(frames) - num_frames :]
        extra = np.repeat(frames[-1:], num_frames - len(frames), axis=0)
        return np.concatenate([frames, extra], axis=0)
    frames = list(frames)[-num_frames:]
    return frames + [frames[-1]] * (num_frames - len(frames))


def normalize_clip(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> float32 (3, T, H, W): ``(x / 255 - mean) / std`` (Kinetics)."""
    if not isinstance(frames_uint8, np.ndarray) or frames_uint8.dtype != np.uint8:
        dtype = getattr(frames_uint8, "dtype", type(frames_uint8).__name__)
        raise TypeError(f"normalize_clip expects a uint8 array, got {dtype}")
    if frames_uint8.ndim != 4 or frames_uint8.shape[3] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {frames_uint8.shape}")
    out = np.empty((3, *frames_uint8.shape[:3]), dtype=np.float32)
    for c in range(3):
        np.take(_NORM_LUT[c], frames_uint8[..., c], out=out[c])
    return out


@dataclass(frozen=True)
class VideoClip:
    """A prepared clip and how it was made.

    Attributes:
        pixel_values: float32 (3, T, S, S), normalised (the model's video input).
        face_found: whether ``box`` is a detected face (False: centre crop).
        box: the crop box used, in source pixels (the face box, or the centre square).
        num_source_frames: real frames before padding (< T means the clip was padded).
        fps: the source frame rate (``None`` for in-memory frames or when unknown).
    """

    pixel_values: np.ndarray
    face_found: bool
    box: FaceBox
    num_source_frames: int
    fps: float | None


def _as_frames(source: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Validate in-memory frames: uint8 RGB (H, W, 3), all the same size, at least one."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(
                "expected a (T, H, W, 3) uint8 array or a sequence of (H, W, 3) frames, "
                f"got an array of shape {source.shape}"
            )
        frames = list(source)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        frames = list(source)
    else:
        raise TypeError(
            f"video source must be a path or a sequence of RGB frames, got {type(source).__name__}"
        )
    if not frames:
        raise ValueError("the video source has zero frames")
    shape = None
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame {i} is a {type(frame).__name__}, expected a numpy array")
        if frame.dtype != np.uint8:
            raise TypeError(f"frames must be uint8 RGB (0-255); frame {i} has dtype {frame.dtype}")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(
                f"expected RGB frames of shape (H, W, 3); frame {i} has shape {frame.shape} "
                "(convert grayscale or RGBA to RGB first)"
            )
        if frame.shape[0] < 1 or frame.shape[1] < 1:
            raise ValueError(f"frame {i} is empty: shape {frame.shape}")
        if shape is None:
            shape = frame.shape
        elif frame.shape != shape:
            raise ValueError(
                f"all frames of a clip must have the same size; frame 0 is {shape}, "
                f"frame {i} is {frame.shape}"
            )
    return frames


def prepare_video(
    source: str | os.PathLike[str] | Sequence[np.ndarray] | np.ndarray,
    *,
    face_crop: bool = True,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
    detector: FaceDetector | None = None,
) -> VideoClip:
    """A video file or RGB frames -> the model's video input, with how it was made.

    Args:
        source: a video file path, a sequence of uint8 (H, W, 3) RGB frames, or a uint8
            (T, H, W, 3) array. Any frame size (odd sizes too); only the last
            ``num_frames`` frames are used. Grayscale or RGBA frames are rejected: convert
            them to RGB first.
        face_crop: crop to the clip's face box (centre square when no face is found);
            ``False`` always takes the centre square (for sources already cropped to a face).
        num_frames: frames per clip (T).
        size: output side in pixels (S).
        detector: a :class:`~smart_turn_mm.face.FaceDetector` (default: the shared one).

    Returns:
        a :class:`VideoClip` whose ``pixel_values`` is float32 (3, T, S, S).

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: frames that are not uint8 numpy arrays, or a source of another type.
        ValueError: an unreadable file, zero frames, non-RGB frames, frames of mixed sizes.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames: Sequence[np.ndarray]
    if isinstance(source, (str, os.PathLike)):
        tail = _decode_tail(source, num_frames)
        frames, fps = _RGBFrames(tail.frames), tail.fps
        height, width = tail.frames[0].height, tail.frames[0].width
    else:
        frames, fps = _as_frames(source)[-num_frames:], None
        height, width = frames[0].shape[:2]
    if face_crop:
        box, found = clip_face_box(frames, detector)
    else:
        box, found = center_box(height, width), False
    crops = crop_frames(frames, box, size)
    pixels = normalize_clip(pad_frames(crops, num_frames))
    return VideoClip(pixels, found, box, len(frames), fps)


def video_tensor(
    source: str | os.PathLike[str] | Sequence[np.ndarray] | np.ndarray,
    face_crop: bool = True,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
) -> np.ndarray:
    """float32 (3, T, S, S) video input from a path or RGB frames (see :func:`prepare_video`)."""
    return prepare_video(source, face_crop=face_crop, num_frames=num_frames, size=size).pixel_values
