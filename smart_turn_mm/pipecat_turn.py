"""Pipecat integration: a turn analyzer that sees the user's face (``smart-turn-mm[pipecat]``).

:class:`SmartTurnMultimodalAnalyzer` is a Pipecat ``BaseTurnAnalyzer`` (through Pipecat's
``BaseSmartTurn``, which owns the audio buffering, the stop timeout and the worker thread) that
runs a Smart Turn Multimodal model on the turn's audio and on the user's last video frames,
face-cropped with the project's one face crop. Without frames (no camera, frames too old, no
face, or an audio-only model) it decides from the audio alone (the zero video embedding).

:class:`VideoFrameFeeder` is a small frame processor placed after the transport's input: it
hands every ``InputImageRawFrame`` (``UserImageRawFrame`` included) to the analyzer and passes
all frames on unchanged::

    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from smart_turn_mm.pipecat_turn import SmartTurnMultimodalAnalyzer, VideoFrameFeeder

    analyzer = SmartTurnMultimodalAnalyzer(model="path/to/smart-turn-multimodal-cpu.onnx")
    strategies = UserTurnStrategies(
        stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=analyzer)]
    )
    # LLMUserAggregatorParams(user_turn_strategies=strategies), and in the pipeline:
    pipeline = Pipeline([transport.input(), VideoFrameFeeder(analyzer), stt, ...])

The transport must deliver the user's camera (e.g. ``video_in_enabled=True``); a frame rate
near 30 fps matches the model's training clips (32 frames, about 1.07 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from loguru import logger
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn, SmartTurnParams
from pipecat.frames.frames import Frame, ImageRawFrame, InputImageRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from smart_turn_mm.audio import SAMPLE_RATE, to_mono_16k
from smart_turn_mm.face import FaceDetector
from smart_turn_mm.inference import TurnModel, load_model
from smart_turn_mm.realtime import TurnScores, downscale_frame, score_turn

__all__ = ["SmartTurnMultimodalAnalyzer", "VideoFrameFeeder", "image_to_rgb"]

# Raw pixel formats accepted from Pipecat image frames: channels, and the RGB channel order.
_RAW_FORMATS = {
    "RGB": (3, (0, 1, 2)),
    "RGBA": (4, (0, 1, 2)),
    "RGBX": (4, (0, 1, 2)),
    "BGR": (3, (2, 1, 0)),
    "BGRA": (4, (2, 1, 0)),
    "BGRX": (4, (2, 1, 0)),
}
# Encoded images (e.g. from RTVI) are decoded with PyAV.
_ENCODED_FORMATS = {"JPEG": "mjpeg", "JPG": "mjpeg", "PNG": "png"}


def image_to_rgb(image: bytes, size: tuple[int, int], fmt: str | None) -> np.ndarray:
    """Pipecat image bytes -> uint8 (H, W, 3) RGB.

    Args:
        image: raw pixels (RGB, RGBA, BGR, BGRA...) or an encoded JPEG / PNG.
        size: (width, height), as Pipecat gives it.
        fmt: the pixel format name (``None`` = RGB).

    Raises:
        ValueError: unknown format, or a byte count that does not match the size.
    """
    name = (fmt or "RGB").upper()
    width, height = (int(v) for v in size)
    if name in _ENCODED_FORMATS:
        import av

        codec = av.CodecContext.create(_ENCODED_FORMATS[name], "r")
        try:
            decoded = codec.decode(av.Packet(bytes(image)))
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode {name} image: {e}") from e
        if not decoded:
            raise ValueError(f"cannot decode {name} image: no picture")
        return decoded[0].to_ndarray(format="rgb24")
    if name not in _RAW_FORMATS:
        known = ", ".join([*_RAW_FORMATS, *_ENCODED_FORMATS])
        raise ValueError(f"unsupported image format {fmt!r} (supported: {known})")
    channels, order = _RAW_FORMATS[name]
    if width < 1 or height < 1 or len(image) != width * height * channels:
        raise ValueError(
            f"{name} image of size {width}x{height} needs {width * height * channels} bytes, "
            f"got {len(image)}"
        )
    pixels = np.frombuffer(image, np.uint8).reshape(height, width, channels)
    return pixels[..., list(order)]


class SmartTurnMultimodalAnalyzer(BaseSmartTurn):
    """Pipecat turn analyzer running Smart Turn Multimodal on audio and the user's face.

    Args:
        model: a :class:`~smart_turn_mm.inference.TurnModel`, a model path / directory / Hub
            id, or ``None`` (``$SMART_TURN_MM_MODEL``, the Hub, then Pipecat's audio-only v3.2).
        threshold: the turn is complete when the probability is above this.
        max_frame_age_secs: frames older than this at a decision are not used.
        face_detector: for the face crop (default: the shared YuNet detector).
        providers, threads: ONNX Runtime settings when the model is loaded here.
        sample_rate, params: as for Pipecat's ``BaseSmartTurn`` (``params.stop_secs`` is the
            silence after which the turn ends whatever the model says).
    """

    def __init__(
        self,
        *,
        model: str | os.PathLike[str] | TurnModel | None = None,
        threshold: float = 0.5,
        max_frame_age_secs: float = 0.5,
        face_detector: FaceDetector | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        sample_rate: int | None = None,
        params: SmartTurnParams | None = None,
    ) -> None:
        super().__init__(sample_rate=sample_rate, params=params)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_frame_age_secs < 0:
            raise ValueError(f"max_frame_age_secs must be >= 0, got {max_frame_age_secs}")
        self._model = load_model(model, providers=providers, threads=threads)
        self._threshold = float(threshold)
        self._max_frame_age = float(max_frame_age_secs)
        self._face_detector = face_detector
        capacity = 2 * int(self._model.num_frames or 32)
        self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=capacity)
        self._frames_lock = threading.Lock()  # frames come from the event loop, read on a thread
        self.last_scores: TurnScores | None = None
        logger.debug(f"{self}: loaded {self._model}")

    @property
    def model(self) -> TurnModel:
        return self._model

    @property
    def has_video(self) -> bool:
        """Whether the model uses video (an audio-only model ignores frames)."""
        return self._model.has_video

    def push_image(
        self,
        image: bytes | np.ndarray,
        size: tuple[int, int] | None = None,
        fmt: str | None = "RGB",
        timestamp: float | None = None,
    ) -> bool:
        """Store one video frame of the user; returns whether it was kept.

        Args:
            image: uint8 (H, W, 3) RGB array, or Pipecat image bytes (see :func:`image_to_rgb`).
            size: (width, height) of image bytes.
            fmt: pixel format of image bytes.
            timestamp: ``time.monotonic()`` of the frame (default: now).
        """
        if not self.has_video:
            return False
        if isinstance(image, np.ndarray):
            rgb = image
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"expected uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
        else:
            if size is None:
                raise ValueError("size (width, height) is required with image bytes")
            rgb = image_to_rgb(image, size, fmt)
        small = downscale_frame(rgb)
        now = time.monotonic() if timestamp is None else float(timestamp)
        with self._frames_lock:
            if self._frames and self._frames[-1][1].shape != small.shape:
                self._frames.clear()  # the camera changed resolution
            self._frames.append((now, small))
        return True

    def push_frame(self, frame: ImageRawFrame) -> bool:
        """Store a Pipecat image frame (see :meth:`push_image`)."""
        return self.push_image(frame.image, frame.size, frame.format)

    def recent_frames(self, now: float | None = None) -> list[np.ndarray]:
        """The frames of the model's clip: the last T, if the newest is recent enough."""
        now = time.monotonic() if now is None else now
        with self._frames_lock:
            frames = list(self._frames)
        if not frames or now - frames[-1][0] > self._max_frame_age:
            return []
        return [f for _, f in frames][-int(self._model.num_frames or 32) :]

    def _predict_endpoint(self, audio_array: np.ndarray) -> dict[str, Any]:
        """Called by ``BaseSmartTurn`` on its worker thread with the turn's float32 audio."""
        audio = to_mono_16k(np.asarray(audio_array, np.float32), self.sample_rate or SAMPLE_RATE)
        frames = self.recent_frames() if self.has_video else []
        scores = score_turn(self._model, audio, frames, detector=self._face_detector)
        self.last_scores = scores
        probability = scores.probability
        logger.debug(
            f"{self}: p={probability:.3f} (audio {scores.audio_probability:.3f}, "
            f"audio+video {scores.av_probability}), {len(frames)} frames, "
            f"face {scores.face_found}, {sum(scores.timings_ms.values()):.1f} ms"
        )
        return {
            "prediction": int(probability > self._threshold),
            "probability": probability,
            "audio_probability": scores.audio_probability,
            "av_probability": scores.av_probability,
            "face_found": scores.face_found,
        }


class VideoFrameFeeder(FrameProcessor):
    """Feeds the pipeline's ``InputImageRawFrame``s to a :class:`SmartTurnMultimodalAnalyzer`.

    Every frame is passed on unchanged. Place it after the transport's input.

    Args:
        analyzer: the analyzer to feed.
        user_id: only frames of this user (``UserImageRawFrame.user_id``); default: all.
        transport_source: only frames of this video source (e.g. ``"camera"``); default: all.
    """

    def __init__(
        self,
        analyzer: SmartTurnMultimodalAnalyzer,
        *,
        user_id: str | None = None,
        transport_source: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._analyzer = analyzer
        self._user_id = user_id
        self._source = transport_source
        self._warned = False
        self.frames_fed = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputImageRawFrame) and self._wanted(frame):
            try:
                if self._analyzer.push_frame(frame):
                    self.frames_fed += 1
            except ValueError as e:
                if not self._warned:  # once: a bad stream would flood the log
                    logger.warning(f"{self}: video frame not used for turn detection: {e}")
                    self._warned = True
        await self.push_frame(frame, direction)

    def _wanted(self, frame: InputImageRawFrame) -> bool:
        if self._source is not None and frame.transport_source != self._source:
            return False
        return self._user_id is None or getattr(frame, "user_id", None) == self._user_id
