"""The video front end (SPEC 2): a file or RGB frames -> float32 (3, 32, 112, 112).

Pipeline, the same for training and inference:

1. the LAST :data:`NUM_FRAMES` frames at the source frame rate (:func:`read_last_frames`
   seeks near the end of long files instead of decoding them whole);
2. one square face box for the clip (:func:`smart_turn_mm.face.clip_face_box`), or the
   largest centred square when no face is found or ``face_crop=False``;
3. crop and resize to :data:`FRAME_SIZE` (:func:`smart_turn_mm.face.crop_frames`);
4. :func:`pad_frames`: fewer than :data:`NUM_FRAMES` frames -> the last frame repeated;
5. :func:`normalize_clip`: [0, 1], Kinetics-400 mean/std, (C, T, H, W) layout.

From a file, :func:`prepare_video` never converts a whole decoded frame to RGB for the crop:
the decoded YUV frames (from a decoder kept from the last call, :mod:`smart_turn_mm.decoders`,
so FFmpeg recycles its frame buffers) go to :func:`~smart_turn_mm.face.crop_frames`, which
crops first and converts the crop while resizing; only the three frames the face detector looks at
are converted, two of them on a worker thread while the decoder goes on. The tensor is within
about 1.5 grey levels on average of cropping :func:`read_last_frames`' RGB frames (the
same face box; see :func:`~smart_turn_mm.face.crop_frames` for why they differ).

Only numpy and PyAV (imported lazily) are used here; face detection uses ONNX Runtime.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .decoders import decoder
from .face import (
    FaceBox,
    FaceDetector,
    center_box,
    clip_box_from_faces,
    clip_detection_frames,
    clip_face_box,
    crop_frames,
    default_detector,
    sws_options,
)
from .media import open_media, video_streams

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

# (x / 255 - mean) / std = (x - _NORM_SHIFT) * _NORM_SCALE per channel, in float32 (within
# 2e-7 of the float64 result; a 256-entry lookup table is exact but 8x slower in numpy).
_NORM_SHIFT = (255.0 * np.asarray(KINETICS_MEAN)).astype(np.float32)
_NORM_SCALE = (1.0 / (255.0 * np.asarray(KINETICS_STD))).astype(np.float32)

# Extra frames decoded before the wanted tail of a long file, for variable frame rates.
_SEEK_MARGIN_FRAMES = 16


# --------------------------------------------------------------------------- decoding


@dataclass
class _Tail:
    frames: list[Any]  # av.VideoFrame, the last ones in presentation order
    fps: float | None
    num_decoded: int  # frames the decoder output (skipped frames are not counted)
    seeked: bool  # whether the fast path (seek near the end) gave the result


def _timing(stream: Any) -> tuple[int, int, Fraction] | None:
    """(start, end, one frame's duration) of a video stream in its time base, if known."""
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
    return start, start + duration, 1 / (Fraction(rate) * time_base)


def _window_start(stream: Any, num_frames: int) -> int | None:
    """The pts (stream time base) before which frames cannot be among the last ones."""
    timing = _timing(stream)
    if timing is None:
        return None
    _, end, step = timing
    return int(end - (num_frames + _SEEK_MARGIN_FRAMES) * step)


def _is_iso_media(path: str) -> bool:
    """Whether ``path`` is an ISO base media file (MP4, MOV, M4V, 3GP: ``ftyp`` box first).

    Their demuxer derives the decoding delay (B-frame reordering) from the composition time
    offsets, so FFmpeg's probe need not decode frames to guess it (and this decoder, which
    starts at a seek, relies on it). Others (Matroska, MPEG-TS) get the full probe: skipped
    there, the delay of the benchmark clip's stream is guessed as 1 frame instead of 2.
    """
    try:
        with open(path, "rb") as f:
            return f.read(12)[4:8] == b"ftyp"
    except OSError:
        return False  # open_media reports it


def _h264_slices(packet: Any, extradata: bytes | None) -> int:
    """The coded slices (NAL units of types 1 and 5) in one H.264 access unit, with NAL units
    length-prefixed (MP4, MKV: ``avcC`` extradata) or after start codes (Annex B)."""
    data = bytes(packet)
    if extradata and len(extradata) > 4 and extradata[0] == 1:  # avcC
        size, pos, count = (extradata[4] & 3) + 1, 0, 0
        while pos + size < len(data):
            count += data[pos + size] & 0x1F in (1, 5)
            pos += size + int.from_bytes(data[pos : pos + size], "big")
        return count
    return sum(1 for unit in data.split(b"\x00\x00\x01")[1:] if unit and unit[0] & 0x1F in (1, 5))


def _threads(codec: Any, first_packet: Any) -> int:
    """Decoding threads for the tail: one per slice of an H.264 stream whose frames have
    several (x264 with sliced threads, as PyAV's encoder runs it by default, or a WebRTC
    encoder), up to the core count; otherwise one.

    Measured on 2 cores (the tail of the benchmark clip, 2 slices a frame, P50 of 80): 34 ms
    with two slice threads against 43 ms with one. A single-slice stream (x264's own default)
    has nothing to share out, and FFmpeg's frame threads gain nothing on these short tails
    (42 ms, and 59 ms of CPU against 43). With the face detector running beside the decoder
    (:func:`prepare_video`), one thread is faster: see :func:`_decode`'s ``threads``.
    """
    if codec.name != "h264":
        return 1
    return max(1, min(_h264_slices(first_packet, codec.extradata), os.cpu_count() or 1))


def _decode(
    path: str,
    num_frames: int,
    fast: bool,
    watcher: Any = None,
    exact_start: bool = True,
    threads: int | None = None,
) -> _Tail:
    """Decode ``path`` keeping its last ``num_frames`` frames.

    ``fast``: seek to the keyframe before the window and, before the window, let the decoder
    skip frames that no other frame references (``skip_frame = NONREF``); the frames in the
    window are decoded exactly as a full decode gives them. The window's start is estimated
    from the duration and frame rate (with a margin of :data:`_SEEK_MARGIN_FRAMES`); with
    ``exact_start`` the packets from there on are held back until the end of the file, whose
    ``num_frames`` largest timestamps then give the window's exact start, so that no frame
    of the margin is decoded needlessly either. The result is checked here; any doubt ->
    the margin alone, then a full decode.

    ``watcher``: gets ``watcher.start(stream, num_frames)`` once the file is open and
    ``watcher.frame(frame)`` for every decoded frame, in presentation order.

    ``threads``: decoding threads; ``None``: :func:`_threads` (slice threads for multi-slice
    H.264). Slice threads need both cores for every frame, so work on another thread (the
    face detector of :func:`prepare_video`) stalls them: with the detector beside it, the
    benchmark clip's tail was decoded faster with one thread (paired runs of
    :func:`prepare_video`, medians 3 to 11 ms lower in four runs of 56 pairs).

    The decoder comes from :func:`smart_turn_mm.decoders.decoder` (kept from an earlier call
    with the same stream parameters, so that FFmpeg recycles its frame buffers).
    """
    import av

    with open_media(path, "video", probe_video_frames=not _is_iso_media(path)) as container:
        streams = video_streams(container)
        if not streams:
            raise ValueError(f"{path} has no video stream")
        stream = streams[0]
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
        if watcher is not None:
            watcher.start(stream, num_frames)
        tail: deque[Any] = deque(maxlen=num_frames)
        held: list[Any] = []  # packets from the estimated window start on (exact_start)
        num_decoded = 0
        first_pts = None
        codec: Any = None
        keep = ExitStack()  # holds the decoder: it is kept for the next call on success

        def decode(packet: Any, skip_before: int | None) -> None:
            nonlocal num_decoded, first_pts, codec
            if codec is None:  # the first packet (a keyframe) tells how many threads
                stream_codec = stream.codec_context
                count = _threads(stream_codec, packet) if threads is None else threads
                codec = keep.enter_context(decoder(stream_codec, count))
            if skip_before is not None:
                before = packet.pts is not None and packet.pts < skip_before
                codec.skip_frame = "NONREF" if before else "DEFAULT"
            for frame in codec.decode(packet):
                if num_decoded == 0:
                    first_pts = frame.pts
                num_decoded += 1
                if watcher is not None:
                    watcher.frame(frame)
                if skip_before is not None and frame.pts is not None and frame.pts < skip_before:
                    continue  # before the window: never among the last frames of an exact tail
                tail.append(frame)

        hold = exact_start and threshold is not None
        wide = threshold
        try:
            with keep:
                for packet in container.demux(stream):
                    if held or (hold and (packet.pts is None or packet.pts >= threshold)):
                        held.append(packet)  # and all the packets after it, in decoding order
                    else:
                        decode(packet, threshold)
                if held:
                    stamps = sorted((p.pts for p in held if p.pts is not None), reverse=True)
                    if len(stamps) >= num_frames:
                        threshold = max(threshold, stamps[num_frames - 1])
                    for packet in held:
                        decode(packet, threshold)
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
            tail.clear()
            if threshold != wide:  # the exact start was wrong: try the margin alone
                return _decode(path, num_frames, True, watcher, exact_start=False, threads=threads)
            return _decode(path, num_frames, False, watcher, threads=threads)
    return _Tail(list(tail), fps, num_decoded, seeked)


def _decode_tail(
    path: str | os.PathLike[str], num_frames: int, watcher: Any = None, threads: int | None = None
) -> _Tail:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    tail = _decode(path, num_frames, fast=True, watcher=watcher, threads=threads)
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
    options = sws_options()
    return [frame.to_ndarray(format="rgb24", **options) for frame in tail.frames], tail.fps


# --------------------------------------------------------------------------- early detection

_workers = threading.local()


def _detection_worker() -> ThreadPoolExecutor:
    """The calling thread's face-detection worker: one thread, kept for the thread's later calls.

    Starting a thread for every clip cost about 2.7 ms of :func:`prepare_video` here (median of
    57 paired runs of the benchmark clip). Each calling thread has its own worker, so
    concurrent calls never queue behind each other; it ends when the calling thread does (the
    executor is then collected) and is replaced in a forked child (threads do not survive a
    fork).
    """
    pid = os.getpid()
    if getattr(_workers, "pid", None) != pid:
        _workers.pool = ThreadPoolExecutor(1, thread_name_prefix="smart_turn_mm-face")
        _workers.pid = pid
    return _workers.pool


class _EarlyDetection:
    """Face detection on a worker thread while the decoder goes on.

    The frames expected to become the clip's first and middle detection frames
    (:func:`~smart_turn_mm.face.clip_detection_frames`; the last one is decoded last) are
    recognised by their timestamps and detected at once. :meth:`faces` uses a result only
    for a frame of the same decoding pass with the same timestamp as the frame that ended up
    at that index, and detects any other frame itself, so a wrong guess (variable frame
    rate, a fallback decode) costs time, never correctness. Detection calls never overlap,
    and run in the clip's frame order.
    """

    def __init__(self, detector: FaceDetector | None) -> None:
        self._detector = detector
        self._targets: list[float] = []  # expected pts, in order (floats: compared per frame)
        self._half_step = 0.0
        self._pass = 0  # decoding passes started (a fallback decode starts another)
        self._started: dict[tuple[int, int], Future[np.ndarray]] = {}  # (pass, pts) ->
        self._last: Any = None  # the pass's latest decoded frame (the clip's last one at the end)

    def __enter__(self) -> _EarlyDetection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # After an error: no detection of this call is left queued or running.
        for started in self._started.values():
            started.cancel()
        wait(list(self._started.values()))

    def start(self, stream: Any, num_frames: int) -> None:
        """Called by the decoder once the stream is open (again for a fallback decode)."""
        self._pass += 1
        self._targets = []
        self._last = None
        timing = _timing(stream)
        if timing is None:
            return
        start, end, step = timing
        if end - start < num_frames * step:
            return  # a short clip: its detection frames are not where the model's would be
        self._half_step = float(step / 2)
        indices = clip_detection_frames(num_frames)[:-1]
        self._targets = [float(end - (num_frames - i) * step) for i in indices]

    def frame(self, frame: Any) -> None:
        """Called by the decoder for every decoded frame, in presentation order."""
        self._last = frame  # detected as it is, with no copy, if it ends the clip
        if not self._targets or frame.pts is None:
            return
        if abs(frame.pts - self._targets[0]) <= self._half_step:
            self._targets.pop(0)
            self._started[self._pass, frame.pts] = _detection_worker().submit(self._detect, frame)
        elif frame.pts > self._targets[0]:
            self._targets.pop(0)  # no frame there

    def _detect(self, frame: Any) -> np.ndarray:
        detector = self._detector or default_detector()
        return detector.detect(frame.to_ndarray(format="rgb24", **sws_options()))

    def faces(self, frames: Sequence[Any]) -> list[np.ndarray]:
        """Detector outputs for the clip's detection frames, in order."""
        # Guesses of an abandoned decode may still run: never call the detector alongside.
        wait(list(self._started.values()))
        faces = []
        for i in clip_detection_frames(len(frames)):
            frame, pts = frames[i], frames[i].pts
            started = None if pts is None else self._started.get((self._pass, pts))
            if started is not None:
                faces.append(started.result())
                continue
            if i == len(frames) - 1 and pts is not None and getattr(self._last, "pts", None) == pts:
                frame = self._last  # the decoder's own frame of this pass: the same pixels
            faces.append(self._detect(frame))
        return faces


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


def normalize_clip(frames_uint8: np.ndarray, *, channels_first: bool = False) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> float32 (3, T, H, W): ``(x / 255 - mean) / std`` (Kinetics).

    ``channels_first``: the input is already (3, T, H, W) (``crop_frames(channels_first=True)``).
    """
    if not isinstance(frames_uint8, np.ndarray) or frames_uint8.dtype != np.uint8:
        dtype = getattr(frames_uint8, "dtype", type(frames_uint8).__name__)
        raise TypeError(f"normalize_clip expects a uint8 array, got {dtype}")
    layout = "(3, T, H, W)" if channels_first else "(T, H, W, 3)"
    if frames_uint8.ndim != 4 or frames_uint8.shape[0 if channels_first else 3] != 3:
        raise ValueError(f"expected {layout} frames, got shape {frames_uint8.shape}")
    planes = frames_uint8 if channels_first else frames_uint8.transpose(3, 0, 1, 2)
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(3):
        np.subtract(planes[c], _NORM_SHIFT[c], out=out[c], dtype=np.float32)
        out[c] *= _NORM_SCALE[c]
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
        a :class:`VideoClip` whose ``pixel_values`` is float32 (3, T, S, S). From a file,
        the frames are cropped before their conversion to RGB (see the module's notes):
        the same box as for :func:`read_last_frames`' frames, pixels within about 1.5 grey
        levels on average.

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: frames that are not uint8 numpy arrays, or a source of another type.
        ValueError: an unreadable file, zero frames, non-RGB frames, frames of mixed sizes.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames: Sequence[Any]
    if isinstance(source, (str, os.PathLike)):
        # Decoded frames stay in YUV: the detector converts the 3 it looks at (two of them
        # on a worker thread while decoding goes on), crop_frames crops before converting.
        with _EarlyDetection(detector) as early:
            if face_crop:  # the detector's worker beside the decoder: one decoding thread
                tail = _decode_tail(source, num_frames, early, threads=1)
            else:
                tail = _decode_tail(source, num_frames)
            frames, fps = tail.frames, tail.fps
            height, width = frames[0].height, frames[0].width
            if face_crop:
                box, found = clip_box_from_faces(early.faces(frames), height, width)
            else:
                box, found = center_box(height, width), False
            crops = crop_frames(pad_frames(frames, num_frames), box, size, channels_first=True)
    else:
        frames, fps = _as_frames(source)[-num_frames:], None
        height, width = frames[0].shape[:2]
        if face_crop:
            box, found = clip_face_box(frames, detector)
        else:
            box, found = center_box(height, width), False
        crops = crop_frames(pad_frames(frames, num_frames), box, size, channels_first=True)
    pixels = normalize_clip(crops, channels_first=True)
    return VideoClip(pixels, found, box, len(frames), fps)


def video_tensor(
    source: str | os.PathLike[str] | Sequence[np.ndarray] | np.ndarray,
    face_crop: bool = True,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
) -> np.ndarray:
    """float32 (3, T, S, S) video input from a path or RGB frames (see :func:`prepare_video`)."""
    return prepare_video(source, face_crop=face_crop, num_frames=num_frames, size=size).pixel_values
