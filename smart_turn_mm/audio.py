"""Audio front end: decode, down-mix, resample, window and Whisper log-mel features.

Everything the model's audio branch sees goes through :func:`whisper_features`:

1. decode (:func:`load_audio`) or convert (:func:`to_mono_16k`) to mono float32 at 16 kHz;
2. keep the LAST 8 s (:func:`last_window`), zero-padding shorter audio on the left so that
   speech always ends at the right edge, where the model looks for the end of a turn;
3. normalise the whole 8 s window and compute Whisper's log-mel spectrogram, the recipe of
   ``transformers.WhisperFeatureExtractor`` (max abs difference about 1e-5 in the tests).

This module needs numpy and PyAV (FFmpeg) only. PyAV is imported inside the functions that
decode or resample, so ``import smart_turn_mm.audio`` is cheap and never imports torch.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence

import numpy as np

# Whisper and Smart Turn work on 16 kHz mono audio: every signal is resampled to this rate.
SAMPLE_RATE = 16000
# The model sees the last 8 s of audio; Smart Turn v3 cut Whisper's 30 s context to this.
WINDOW_SECONDS = 8
# Samples in one window: 8 s x 16 kHz = 128,000.
N_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS
# STFT size: 400 samples = 25 ms at 16 kHz, giving 201 frequency bins of 40 Hz.
N_FFT = 400
# STFT hop: 160 samples = 10 ms, i.e. 100 feature frames per second.
HOP_LENGTH = 160
# Mel filters, spanning 0 Hz to the Nyquist frequency (8 kHz).
N_MELS = 80
# Feature frames per window: the centred STFT yields N_SAMPLES / HOP_LENGTH + 1 = 801 frames
# and Whisper drops the last one, leaving 800 (the encoder halves this to 400 positions).
N_FRAMES = N_SAMPLES // HOP_LENGTH

# Accepted input sample rates (Hz): below 1 kHz is surely a mistake (telephone audio is
# 8 kHz); 384 kHz is the highest rate common audio hardware produces.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000

# Whisper's `do_normalize`: (x - mean) / sqrt(var + _NORM_EPS) over the whole window.
_NORM_EPS = 1e-7
# Mel power floor before the log (Whisper: log10(max(mel, 1e-10))).
_MEL_FLOOR = 1e-10
# Whisper keeps 8 decades of dynamic range below the loudest mel bin of the window.
_DYNAMIC_RANGE_DECADES = 8.0
# Frames transformed per FFT batch: small batches stay in cache (about 2x faster than one
# batch of 800 here) without paying much per-call overhead.
_FRAME_BATCH = 80
# Frames per filter-bank product. OpenBLAS runs a GEMM of at most 262,144 multiply-adds on
# the calling thread; 80 x 201 x 16 = 257,280 stays under that (17 frames do not). Larger
# products wake its thread pool, which stalled feature extraction from about 3 ms to over
# 100 ms whenever another process kept the 2 cores of the test machine busy.
_GEMM_FRAMES = 16
# Samples per PyAV frame when resampling in-memory audio.
_RESAMPLE_CHUNK = 1 << 16

# Integer PCM scales to [-1, 1); floats are taken as already in [-1, 1].
_PCM_SCALE = {
    np.dtype(np.int16): 1.0 / 32768.0,
    np.dtype(np.int32): 1.0 / 2147483648.0,
    np.dtype(np.float32): 1.0,
    np.dtype(np.float64): 1.0,
}

# Anything FFmpeg can open: a path to a file or its bytes in memory.
AudioSource = str | os.PathLike | bytes


# ---------------------------------------------------------------------------------------------
# Decoding and conversion
# ---------------------------------------------------------------------------------------------


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of a file (WAV, MP3, FLAC, MP4/AAC, ...) with PyAV.

    Channels are averaged to mono (the same rule as :func:`to_mono_16k`), then the signal is
    resampled to ``sample_rate`` with FFmpeg's libswresample.

    Args:
        source: a path, or the bytes of a whole file.
        sample_rate: output rate in Hz.

    Returns:
        float32 array ``(n,)`` in [-1, 1] at ``sample_rate``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a media file, no audio stream, undecodable data, or no samples.

    Note:
        Lossy codecs pad: an AAC stream has 1024 priming samples at the start (MP4 edit lists
        usually tell FFmpeg to drop them) and is padded to whole 1024-sample frames at the end,
        so decoded lengths can differ from the original by up to about one codec frame.
    """
    sample_rate = _check_sample_rate(sample_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes>"
        file: object = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(2, "audio file not found", name)
        file = name
    else:
        raise TypeError(
            f"source must be a path (str or os.PathLike) or bytes, got {type(source).__name__}"
        )

    import av  # lazy: keeps `import smart_turn_mm.audio` cheap

    from smart_turn_mm.media import open_media

    # The probe need not decode video frames: only the audio stream is decoded here (loading
    # the benchmark clip's audio from its MP4 takes 7.0 ms instead of 9.3).
    with open_media(file, "audio", name, probe_video_frames=False) as container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise ValueError(f"{name}: no audio stream (streams found: {kinds})")
        stream = container.streams.audio[0]
        # Format conversion only (source rate and channels kept): down-mixing and resampling
        # then follow exactly the in-memory path of `to_mono_16k`.
        converter = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        source_rate: int | None = None
        try:
            for frame in container.decode(stream):
                if source_rate is None:
                    source_rate = frame.sample_rate
                elif frame.sample_rate != source_rate:
                    raise ValueError(
                        f"{name}: sample rate changes inside the stream "
                        f"({source_rate} Hz, then {frame.sample_rate} Hz)"
                    )
                for planar in converter.resample(frame):
                    # fltp -> (channels, samples); average the channels.
                    chunks.append(planar.to_ndarray().mean(axis=0, dtype=np.float32))
            for planar in converter.resample(None):
                chunks.append(planar.to_ndarray().mean(axis=0, dtype=np.float32))
        except av.error.FFmpegError as e:
            raise ValueError(f"{name}: corrupt or undecodable audio stream ({e})") from e

    mono = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if mono.size == 0 or source_rate is None:
        raise ValueError(f"{name}: the audio stream decoded to zero samples")
    if not np.isfinite(mono).all():
        raise ValueError(f"{name}: decoded audio contains NaN/inf")
    return _resample(mono, source_rate, sample_rate)


def to_mono_16k(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Convert in-memory PCM to mono float32 at 16 kHz.

    Args:
        audio: float32/float64 in [-1, 1] (not clipped or rescaled), int16 (divided by
            32768) or int32 (divided by 2**31). Rank 1 is mono, shape ``(n,)``. Rank 2 is
            multichannel and THE SMALLER AXIS IS THE CHANNEL AXIS, so ``(n, 2)`` and ``(2, n)``
            are both stereo; channels are averaged. A square array is ambiguous and rejected.
        sample_rate: rate of ``audio`` in Hz, an int in [1000, 384000]; other rates are
            resampled to 16 kHz with FFmpeg's libswresample.

    Returns:
        float32 array ``(m,)`` with ``m ~= n * SAMPLE_RATE / sample_rate``; always a new array.

    Raises:
        TypeError: unsupported dtype.
        ValueError: empty, rank > 2, square, non-finite values, or a bad sample rate.
    """
    sample_rate = _check_sample_rate(sample_rate)
    arr = np.asarray(audio)
    scale = _PCM_SCALE.get(arr.dtype)
    if scale is None:
        raise TypeError(f"audio dtype must be float32, float64, int16 or int32, got {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"audio must be 1-D (samples,) or 2-D (samples, channels) / (channels, samples), "
            f"got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"audio is empty (shape {arr.shape})")
    if arr.ndim == 2:
        if arr.shape[0] == arr.shape[1]:
            raise ValueError(
                f"cannot tell channels from samples in a square array of shape {arr.shape}: "
                "the smaller axis is taken as channels"
            )
        channel_axis = 0 if arr.shape[0] < arr.shape[1] else 1
        mono = arr.mean(axis=channel_axis, dtype=np.float64 if scale != 1.0 else None)
        mono = mono.astype(np.float32)
    else:
        mono = arr.astype(np.float32)
    if scale != 1.0:
        mono *= np.float32(scale)
    if not np.isfinite(mono).all():
        bad = int(mono.size - np.count_nonzero(np.isfinite(mono)))
        raise ValueError(f"audio contains NaN/inf ({bad} of {mono.size} samples)")
    return _resample(mono, sample_rate, SAMPLE_RATE)


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of 16 kHz mono audio, the model's input window.

    Shorter audio is zero-padded on the LEFT (speech ends at the right edge); longer audio
    keeps its tail.

    Args:
        audio: float ``(n,)`` at 16 kHz (see :func:`to_mono_16k`).

    Returns:
        float32 ``(N_SAMPLES,)`` = ``(128000,)``, a new array.
    """
    arr = np.asarray(audio)
    if arr.ndim != 1:
        raise ValueError(f"last_window expects mono audio of shape (n,), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"last_window expects float audio in [-1, 1], got {arr.dtype}; "
            "convert with to_mono_16k first"
        )
    if arr.shape[0] >= N_SAMPLES:
        return arr[arr.shape[0] - N_SAMPLES :].astype(np.float32)
    window = np.zeros(N_SAMPLES, np.float32)
    window[N_SAMPLES - arr.shape[0] :] = arr
    return window


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def whisper_features(audio: np.ndarray | AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Whisper log-mel features of the last 8 s of ``audio``.

    Args:
        audio: PCM array (any input :func:`to_mono_16k` accepts), or a path / file bytes
            (decoded by :func:`load_audio`).
        sample_rate: rate of an array in Hz. Ignored for files, which carry their own rate.

    Returns:
        float32 ``(N_MELS, N_FRAMES)`` = ``(80, 800)``.
    """
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        mono = load_audio(audio, SAMPLE_RATE)
    else:
        mono = to_mono_16k(audio, sample_rate)
    return _log_mel(last_window(mono))


def batch_features(
    audios: Sequence[np.ndarray | AudioSource], sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """:func:`whisper_features` of each clip, stacked.

    Each clip is windowed and normalised on its own, exactly as it would be alone.

    Args:
        audios: B clips (arrays, paths or bytes), all arrays at ``sample_rate``.
        sample_rate: rate of the arrays in Hz.

    Returns:
        float32 ``(B, N_MELS, N_FRAMES)`` = ``(B, 80, 800)``.
    """
    out = np.empty((len(audios), N_MELS, N_FRAMES), np.float32)
    for i, audio in enumerate(audios):
        out[i] = whisper_features(audio, sample_rate)
    return out


def _log_mel(window: np.ndarray) -> np.ndarray:
    """Normalised Whisper log-mel of one float32 ``(N_SAMPLES,)`` window -> ``(80, 800)``."""
    half = N_FFT // 2
    # Whisper's normalisation (x - mean) / sqrt(var + eps): the mean is removed here with the
    # float32 ops transformers uses; the 1 / (var + eps) factor of the power spectrum is folded
    # into the filter bank below. The result goes straight into a float64 buffer with room for
    # the centred STFT's reflect padding (numpy's float64 FFT is faster than its float32 one).
    padded = np.empty(window.shape[0] + 2 * half)
    centre = padded[half:-half]
    np.subtract(window, window.mean(), out=centre)
    variance = float(np.einsum("i,i->", centre, centre)) / centre.shape[0]
    padded[:half] = centre[half:0:-1]
    padded[-half:] = centre[-2 : -half - 2 : -1]
    # Frame i covers padded[i*HOP : i*HOP + N_FFT]; the 801st frame is dropped as in Whisper.
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:N_FRAMES]
    hann = _hann_window()
    bank = (_mel_filters() * (1.0 / (variance + _NORM_EPS))).astype(np.float32)  # (80, 201)

    mel = np.empty((N_MELS, N_FRAMES), np.float32)
    # Frames lying wholly in the leading zeros (the left padding of short audio) are all
    # equal: transform only the last of them and copy it to the others.
    n_same = _leading_zero_frames(window)
    for start in range(max(n_same - 1, 0), N_FRAMES, _FRAME_BATCH):
        stop = min(start + _FRAME_BATCH, N_FRAMES)
        spectrum = np.fft.rfft(frames[start:stop] * hann, axis=-1)  # (frames, 201) complex128
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        for i in range(start, stop, _GEMM_FRAMES):
            j = min(i + _GEMM_FRAMES, stop)
            np.matmul(bank, power[i - start : j - start].T, out=mel[:, i:j])
    if n_same > 1:
        mel[:, : n_same - 1] = mel[:, n_same - 1 : n_same]

    np.maximum(mel, _MEL_FLOOR, out=mel)
    # log10 as ln * log10(e): numpy's float32 ln is vectorised and about 3x faster.
    np.log(mel, out=mel)
    mel *= np.float32(1.0 / math.log(10.0))
    np.maximum(mel, mel.max() - _DYNAMIC_RANGE_DECADES, out=mel)
    mel += 4.0
    mel /= 4.0
    return mel


def _leading_zero_frames(window: np.ndarray) -> int:
    """How many STFT frames of ``window`` see only its leading zeros (reflect padding included).

    Frame i covers samples [i*HOP - N_FFT/2, i*HOP + N_FFT/2), negative ones reflected to
    [1, N_FFT/2], so it is all zeros when the first max(i*HOP + N_FFT/2, N_FFT/2 + 1) are.
    """
    first = int(np.argmax(window != 0))
    if window[first] == 0:  # all zeros
        return N_FRAMES
    if first <= N_FFT // 2:
        return 0
    return (first - N_FFT // 2) // HOP_LENGTH + 1


@functools.lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    """Periodic Hann window ``(N_FFT,)`` float64 (torch.hann_window's default)."""
    n = np.arange(N_FFT, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    window.flags.writeable = False
    return window


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + 27.0 * np.log(np.maximum(hz, 1000.0) / 1000.0) / np.log(6.4)
    return np.where(hz >= 1000.0, log_part, 3.0 * hz / 200.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    log_part = 1000.0 * np.exp(np.log(6.4) / 27.0 * (np.maximum(mel, 15.0) - 15.0))
    return np.where(mel >= 15.0, log_part, 200.0 * mel / 3.0)


@functools.lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    """Slaney-normalised triangular mel filters, float64 ``(N_MELS, N_FFT // 2 + 1)``.

    N_MELS triangles with edges equally spaced on the Slaney mel scale from 0 Hz to
    SAMPLE_RATE / 2, each scaled by 2 / (its width in Hz) so that it has unit area.
    """
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[None, :] - fft_hz[:, None]  # (bins, N_MELS + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))  # (bins, N_MELS)
    filters *= 2.0 / (edges_hz[2:] - edges_hz[:-2])
    filters = np.ascontiguousarray(filters.T)
    filters.flags.writeable = False
    return filters


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _check_sample_rate(sample_rate: int) -> int:
    """Return ``sample_rate`` as an int, or raise ValueError naming it."""
    if (
        isinstance(sample_rate, bool)
        or not isinstance(sample_rate, (int, np.integer))
        or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE
    ):
        raise ValueError(
            f"sample_rate must be an int in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, "
            f"got {sample_rate!r}"
        )
    return int(sample_rate)


def _resample(mono: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 ``(n,)`` with libswresample -> float32 ``(~n * to_rate / from_rate,)``.

    The output starts at the same instant as the input (no added delay) and the resampler is
    flushed, so no tail is lost.
    """
    if from_rate == to_rate:
        return mono
    import av  # lazy: keeps `import smart_turn_mm.audio` cheap

    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    out: list[np.ndarray] = []
    for start in range(0, mono.shape[0], _RESAMPLE_CHUNK):
        chunk = np.ascontiguousarray(mono[None, start : start + _RESAMPLE_CHUNK])
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
        frame.sample_rate = from_rate
        out.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
    out.extend(f.to_ndarray()[0] for f in resampler.resample(None))
    if not out:
        raise ValueError(
            f"resampling {mono.shape[0]} samples from {from_rate} Hz to {to_rate} Hz "
            "produced no output"
        )
    return np.concatenate(out).astype(np.float32, copy=False)
