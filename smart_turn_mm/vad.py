"""Silero voice activity detection with ONNX Runtime: streaming and offline.

The model file is the one shipped inside the ``silero-vad`` wheel (``pip install --no-deps
silero-vad``: the wheel declares torch as a dependency but its ONNX file needs none), or the
copy inside ``pipecat-ai``; nothing is downloaded. Neither package is imported (both import
torch or other heavy modules): their files are found with ``importlib.util.find_spec``.

The model takes 512-sample chunks (32 ms at 16 kHz) preceded by the last 64 samples of the
previous chunk (its context) and carries a recurrent state ``(2, 1, 128)`` from chunk to chunk;
it returns the probability that the chunk is speech.

numpy and onnxruntime only.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.audio import SAMPLE_RATE, to_mono_16k
from smart_turn_mm.locations import packaged_file

__all__ = [
    "CHUNK_SAMPLES",
    "CONTEXT_SAMPLES",
    "VAD_MODEL_ENV",
    "SileroVAD",
    "speech_segments",
    "stop_threshold",
    "vad_model_path",
]

# Environment variable naming a Silero VAD ONNX file (beats the packaged copies).
VAD_MODEL_ENV = "SMART_TURN_MM_VAD_MODEL"
# Samples per VAD chunk at 16 kHz (32 ms): the only chunk size the 16 kHz model accepts.
CHUNK_SAMPLES = 512
# Samples of the previous chunk prepended to each chunk (the model's input is 64 + 512).
CONTEXT_SAMPLES = 64
# Recurrent state carried between chunks: (2, batch, 128).
STATE_SHAPE = (2, 1, 128)
# Hysteresis: once in speech, a chunk counts as silence only below threshold - 0.15
# (Silero's own default ``neg_threshold``), so probabilities hovering near the threshold in
# the middle of a word do not split it.
STOP_OFFSET = 0.15
# The lowest stop threshold, so that a very low speech threshold still has one.
MIN_STOP_THRESHOLD = 0.01

# Where the file lives inside each package (tried in this order).
_PACKAGED = (
    ("silero_vad", ("data", "silero_vad.onnx")),
    ("pipecat", ("audio", "vad", "data", "silero_vad.onnx")),
)


def stop_threshold(threshold: float) -> float:
    """The probability below which a chunk ends speech, for a speech ``threshold``."""
    return max(threshold - STOP_OFFSET, MIN_STOP_THRESHOLD)


def vad_model_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The Silero VAD ONNX file: ``path``, else ``$SMART_TURN_MM_VAD_MODEL``, else the copy in
    the ``silero-vad`` package, else the one in ``pipecat-ai``.

    Raises:
        FileNotFoundError: an explicit path or the environment variable names a missing file,
            or no package ships one (the message says what to install).
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Silero VAD model file not found: {path}")
        return Path(path)
    env = os.environ.get(VAD_MODEL_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${VAD_MODEL_ENV} names a missing file: {env}")
        return Path(env)
    for package, parts in _PACKAGED:
        found = packaged_file(package, parts)
        if found is not None:
            return found
    raise FileNotFoundError(
        "no Silero VAD model found: install the silero-vad wheel without its torch dependency "
        "(`pip install --no-deps silero-vad`), or pipecat-ai, or set "
        f"${VAD_MODEL_ENV} to a silero_vad.onnx file"
    )


_SESSIONS: dict[str, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(path: Path) -> Any:
    """One shared ONNX Runtime session per file (sessions are thread-safe; state is not)."""
    key = str(path.resolve())
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            import onnxruntime as ort

            options = ort.SessionOptions()
            # A 0.1 ms model: more threads only add synchronisation.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = ort.InferenceSession(
                    key, sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:
                raise ValueError(f"cannot load Silero VAD model {path}: {e}") from e
            names = sorted(i.name for i in session.get_inputs())
            if names != ["input", "sr", "state"]:
                raise ValueError(
                    f"{path} is not a Silero VAD v5+ model: inputs {names}, "
                    "expected ['input', 'sr', 'state']"
                )
            _SESSIONS[key] = session
        return _SESSIONS[key]


class SileroVAD:
    """Streaming Silero VAD: call it on consecutive 512-sample chunks of 16 kHz audio.

    Each instance keeps its own recurrent state and context; instances share the ONNX
    Runtime session. Not thread-safe: one stream per instance.

    Args:
        model_path: the ONNX file (default: see :func:`vad_model_path`).
    """

    sample_rate = SAMPLE_RATE
    chunk_samples = CHUNK_SAMPLES

    def __init__(self, model_path: str | os.PathLike[str] | None = None) -> None:
        self.model_path = vad_model_path(model_path)
        self._session = _session(self.model_path)
        self._input = np.zeros((1, CONTEXT_SAMPLES + CHUNK_SAMPLES), np.float32)
        self._state = np.zeros(STATE_SHAPE, np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def reset(self) -> None:
        """Forget the stream: zero state and context."""
        self._input[:] = 0.0
        self._state = np.zeros(STATE_SHAPE, np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        """Speech probability of the next chunk.

        Args:
            chunk: float32 ``(512,)`` in [-1, 1] at 16 kHz, following the previous call's chunk.
        """
        chunk = np.asarray(chunk)
        if chunk.shape != (CHUNK_SAMPLES,):
            raise ValueError(
                f"SileroVAD takes chunks of {CHUNK_SAMPLES} samples (32 ms at 16 kHz), "
                f"got shape {chunk.shape}"
            )
        self._input[0, CONTEXT_SAMPLES:] = chunk
        prob, self._state = self._session.run(
            None, {"input": self._input, "state": self._state, "sr": self._sr}
        )
        # The last 64 samples become the next chunk's context.
        self._input[0, :CONTEXT_SAMPLES] = self._input[0, -CONTEXT_SAMPLES:]
        return float(prob.reshape(-1)[0])

    def probabilities(self, audio16k: np.ndarray) -> np.ndarray:
        """Speech probability of every 512-sample chunk of ``audio16k`` (from a fresh state).

        The last partial chunk is zero-padded. Returns float32 ``(ceil(n / 512),)``.
        """
        audio = np.asarray(audio16k, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio of shape (n,), got {audio.shape}")
        n_chunks = -(-audio.shape[0] // CHUNK_SAMPLES)
        padded = np.zeros(n_chunks * CHUNK_SAMPLES, np.float32)
        padded[: audio.shape[0]] = audio
        self.reset()
        out = np.empty(n_chunks, np.float32)
        for i in range(n_chunks):
            out[i] = self(padded[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES])
        self.reset()
        return out


def speech_segments(
    audio16k: np.ndarray,
    *,
    threshold: float = 0.5,
    min_silence_ms: float = 100.0,
    min_speech_ms: float = 250.0,
    pad_ms: float = 30.0,
    sample_rate: int = SAMPLE_RATE,
    vad: SileroVAD | None = None,
) -> list[tuple[int, int]]:
    """Speech segments of a recording, for cutting it at pauses.

    A segment starts at the first chunk whose probability is >= ``threshold`` and ends at
    the first chunk below :func:`stop_threshold` that starts a silence of at least
    ``min_silence_ms``; segments shorter than ``min_speech_ms`` are dropped, the others are
    widened by ``pad_ms`` on each side (without overlapping their neighbours or leaving the
    recording). Times have the 32 ms resolution of the VAD.

    Args:
        audio16k: mono audio (any dtype :func:`~smart_turn_mm.audio.to_mono_16k` accepts) at
            ``sample_rate`` (default 16 kHz; other rates are resampled first).
        threshold: speech probability threshold.
        min_silence_ms: shorter pauses stay inside a segment.
        min_speech_ms: shorter segments are dropped.
        pad_ms: margin added on each side.
        vad: a :class:`SileroVAD` to use (default: a new one).

    Returns:
        ``[(start_sample, end_sample), ...]`` at 16 kHz, end exclusive, in order.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    for name, value in (("min_silence_ms", min_silence_ms), ("min_speech_ms", min_speech_ms)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if pad_ms < 0:
        raise ValueError(f"pad_ms must be >= 0, got {pad_ms}")
    audio = to_mono_16k(audio16k, sample_rate)
    probs = (vad or SileroVAD()).probabilities(audio)
    n = audio.shape[0]
    per_ms = SAMPLE_RATE / 1000.0
    low = stop_threshold(threshold)
    min_silence = min_silence_ms * per_ms
    raw: list[tuple[int, int]] = []
    start: int | None = None
    silence_start: int | None = None
    for i, p in enumerate(probs):
        pos = i * CHUNK_SAMPLES
        if start is None:
            if p >= threshold:
                start = pos
            continue
        if p >= threshold:
            silence_start = None
        elif p < low:
            if silence_start is None:
                silence_start = pos
            if pos + CHUNK_SAMPLES - silence_start >= min_silence:
                raw.append((start, silence_start))
                start, silence_start = None, None
    if start is not None:
        raw.append((start, silence_start if silence_start is not None else n))
    kept = [(s, min(e, n)) for s, e in raw if min(e, n) - s >= min_speech_ms * per_ms]
    pad = round(pad_ms * per_ms)
    out: list[tuple[int, int]] = []
    for i, (s, e) in enumerate(kept):
        lo = max(s - pad, 0 if not out else out[-1][1])
        hi = min(e + pad, n if i + 1 == len(kept) else max(e, (e + kept[i + 1][0]) // 2))
        out.append((lo, hi))
    return out
