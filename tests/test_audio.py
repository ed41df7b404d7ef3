"""Audio front end: parity with transformers' Whisper extractor, resampling, decoding, errors."""

from __future__ import annotations

import io
import subprocess
import sys
import wave

import numpy as np
import pytest
from signals import speech_like

from smart_turn_mm import audio as A

PARITY_TOL = 1e-4  # SPEC 1: max abs difference against transformers


@pytest.fixture(scope="module")
def reference_extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=8)


def _reference(fe, mono_16k: np.ndarray) -> np.ndarray:
    """transformers' features of the left-padded window, called as SPEC 1 states."""
    from smart_turn_mm.bench import reference_features

    return reference_features(fe, mono_16k)[0]


def _assert_parity(fe, ours: np.ndarray, mono_16k: np.ndarray, case: str) -> None:
    ref = _reference(fe, mono_16k)
    assert ours.shape == (A.N_MELS, A.N_FRAMES) == ref.shape
    assert ours.dtype == np.float32
    assert np.isfinite(ours).all(), f"{case}: non-finite features"
    err = float(np.abs(ours - ref).max())
    assert err <= PARITY_TOL, f"{case}: max abs error {err:.3g} > {PARITY_TOL}"


def _stereo_speech(seconds: float, sr: int) -> np.ndarray:
    return np.stack([speech_like(seconds, sr, seed=1), speech_like(seconds, sr, seed=2)], axis=1)


# --- parity with transformers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "case, audio",
    [
        ("speech 5 s", speech_like(5.0)),
        ("silence", np.zeros(3 * A.SAMPLE_RATE, np.float32)),
        ("clipped", np.clip(4.0 * speech_like(6.0, seed=3), -1.0, 1.0)),
        ("short 0.3 s", speech_like(0.3, seed=4)),
        ("long 12 s", speech_like(12.0, seed=5)),
        ("exactly 8 s", speech_like(8.0, seed=6)),
        ("float64", speech_like(4.0, seed=7).astype(np.float64)),
    ],
)
def test_parity_float_16k(reference_extractor, case, audio):
    _assert_parity(reference_extractor, A.whisper_features(audio), audio.astype(np.float32), case)


@pytest.mark.parametrize("n_zeros", [199, 200, 201, 359, 360, 361, 520, A.N_SAMPLES - 1])
def test_parity_leading_zeros(reference_extractor, n_zeros):
    # Frames wholly inside the leading zeros are computed once and copied: check the edges.
    audio = speech_like(A.WINDOW_SECONDS, seed=13)
    audio[:n_zeros] = 0.0
    ours = A.whisper_features(audio)
    _assert_parity(reference_extractor, ours, audio, f"{n_zeros} leading zeros")


def test_leading_zero_frames_matches_brute_force():
    base = A.last_window(speech_like(A.WINDOW_SECONDS, seed=14))
    for n_zeros in [0, 1, 200, 201, 359, 360, 361, 519, 520, 127879, 127880, A.N_SAMPLES]:
        window = base.copy()
        window[:n_zeros] = 0.0
        padded = np.pad(window, A.N_FFT // 2, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, A.N_FFT)[:: A.HOP_LENGTH]
        expected = next((i for i, f in enumerate(frames[: A.N_FRAMES]) if f.any()), A.N_FRAMES)
        assert A._leading_zero_frames(window) == expected, n_zeros


def test_parity_int16(reference_extractor):
    pcm = (speech_like(5.0, seed=8) * 32767).astype(np.int16)
    mono = pcm.astype(np.float32) / 32768.0
    _assert_parity(reference_extractor, A.whisper_features(pcm), mono, "int16")


def test_parity_stereo(reference_extractor):
    stereo = _stereo_speech(5.0, A.SAMPLE_RATE)  # (n, 2)
    mono = stereo.mean(axis=1)
    _assert_parity(reference_extractor, A.whisper_features(stereo), mono, "stereo (n, 2)")
    np.testing.assert_array_equal(A.whisper_features(stereo.T), A.whisper_features(stereo))


@pytest.mark.parametrize("sr", [44100, 8000])
def test_parity_resampled(reference_extractor, sr):
    audio = speech_like(5.0, sr=sr, seed=9)
    mono = A.to_mono_16k(audio, sr)
    _assert_parity(reference_extractor, A.whisper_features(audio, sr), mono, f"{sr} Hz")


def test_long_audio_keeps_tail():
    audio = speech_like(12.0, seed=10)
    np.testing.assert_array_equal(
        A.whisper_features(audio), A.whisper_features(audio[-A.N_SAMPLES :])
    )


def test_silence_is_constant_floor():
    feats = A.whisper_features(np.zeros(A.SAMPLE_RATE, np.float32))
    np.testing.assert_allclose(feats, (np.log10(1e-10) + 4.0) / 4.0, rtol=0, atol=1e-6)


def test_mel_filters_match_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    ref = audio_utils.mel_filter_bank(
        num_frequency_bins=A.N_FFT // 2 + 1,
        num_mel_filters=A.N_MELS,
        min_frequency=0.0,
        max_frequency=A.SAMPLE_RATE / 2,
        sampling_rate=A.SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(A._mel_filters(), ref.T, rtol=1e-6, atol=1e-9)


def test_batch_features():
    clips = [speech_like(2.0, seed=11), speech_like(9.0, seed=12)]
    batch = A.batch_features(clips)
    assert batch.shape == (2, A.N_MELS, A.N_FRAMES) and batch.dtype == np.float32
    for i, clip in enumerate(clips):
        np.testing.assert_array_equal(batch[i], A.whisper_features(clip))


# --- windowing and conversion ----------------------------------------------------------------


def test_last_window_left_pads_and_keeps_tail():
    short = np.arange(1, 11, dtype=np.float32)
    window = A.last_window(short)
    assert window.shape == (A.N_SAMPLES,) and window.dtype == np.float32
    assert not window[:-10].any()
    np.testing.assert_array_equal(window[-10:], short)

    long = np.arange(A.N_SAMPLES + 500, dtype=np.float64)
    np.testing.assert_array_equal(A.last_window(long), long[500:].astype(np.float32))


def test_to_mono_16k_dtypes_and_channels():
    np.testing.assert_array_equal(
        A.to_mono_16k(np.array([-32768, 0, 16384], np.int16)), [-1.0, 0.0, 0.5]
    )
    np.testing.assert_allclose(A.to_mono_16k(np.array([-(2**31), 2**30], np.int32)), [-1.0, 0.5])
    stereo = np.array([[0.2, 0.4, 0.6], [0.0, 0.0, 0.2]], np.float32)  # (2, n): smaller axis
    np.testing.assert_allclose(A.to_mono_16k(stereo), [0.1, 0.2, 0.4], rtol=1e-6)
    np.testing.assert_allclose(A.to_mono_16k(stereo.T), [0.1, 0.2, 0.4], rtol=1e-6)
    out = A.to_mono_16k(np.zeros(5, np.float64))
    assert out.dtype == np.float32


def test_resampling_keeps_frequency_and_length():
    sr = 44100
    n = 3 * sr
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(n) / sr).astype(np.float32)
    out = A.to_mono_16k(tone, sr)
    expected = n * A.SAMPLE_RATE / sr
    assert abs(out.shape[0] - expected) <= 0.01 * expected, (out.shape, expected)
    zoom = 16  # zero-padded FFT: 1/16 Hz bins
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.shape[0]), n=zoom * A.SAMPLE_RATE))
    peak_hz = np.argmax(spectrum) / zoom
    assert abs(peak_hz - 440.0) <= 2.0, peak_hz
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.01


def test_resampling_from_8k_length():
    out = A.to_mono_16k(speech_like(2.0, sr=8000), 8000)
    assert abs(out.shape[0] - 2 * A.SAMPLE_RATE) <= 0.01 * 2 * A.SAMPLE_RATE


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audio, error, match",
    [
        (np.zeros(0, np.float32), ValueError, "empty"),
        (np.full(1000, np.nan, np.float32), ValueError, "NaN/inf"),
        (np.array([0.0, np.inf, 0.1]), ValueError, "NaN/inf"),
        (np.zeros((2, 3, 100), np.float32), ValueError, "shape"),
        (np.zeros((4, 4), np.float32), ValueError, "square"),
        (np.zeros(100, np.complex64), TypeError, "float32, float64, int16 or int32"),
        (np.zeros(100, np.uint8), TypeError, "uint8"),
        (np.array([0.1, "a"], dtype=object), TypeError, "object"),
    ],
)
def test_bad_audio(audio, error, match):
    with pytest.raises(error, match=match):
        A.whisper_features(audio)


@pytest.mark.parametrize("sr", [0, -16000, 16000.0, 100, 10**6, True])
def test_bad_sample_rate(sr):
    with pytest.raises(ValueError, match="sample_rate"):
        A.to_mono_16k(np.zeros(100, np.float32), sr)


def test_last_window_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        A.last_window(np.zeros((2, 10), np.float32))
    with pytest.raises(TypeError, match="to_mono_16k"):
        A.last_window(np.zeros(10, np.int16))


# --- decoding files ----------------------------------------------------------------------------


def _wav_bytes(pcm: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def test_load_wav_stereo_22050(tmp_path):
    sr = 22050
    stereo = (_stereo_speech(2.0, sr) * 32767).astype(np.int16)
    path = tmp_path / "stereo.wav"
    path.write_bytes(_wav_bytes(stereo, sr))

    mono = A.load_audio(path)
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(mono.shape[0] - 2 * A.SAMPLE_RATE) <= 2
    # Same down-mix rule and resampler as the in-memory path.
    np.testing.assert_allclose(mono, A.to_mono_16k(stereo, sr), atol=1e-5)
    np.testing.assert_array_equal(A.load_audio(path.read_bytes()), mono)
    np.testing.assert_array_equal(A.whisper_features(str(path)), A.whisper_features(mono))


def test_load_aac_in_mp4(tmp_path):
    av = pytest.importorskip("av")
    sr = 44100
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(2 * sr) / sr).astype(np.float32)
    path = tmp_path / "tone.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sr)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
        frame.sample_rate = sr
        frame.pts = 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)

    mono = A.load_audio(path)
    # AAC codes whole 1024-sample frames: the MP4 edit list drops the encoder's priming
    # samples, but the padding of the last frame may remain (up to 1024 samples at 44.1 kHz,
    # about 372 samples at 16 kHz).
    extra = mono.shape[0] - 2 * A.SAMPLE_RATE
    assert -16 <= extra <= 1024 * A.SAMPLE_RATE / sr + 16, mono.shape
    assert 0.2 < np.abs(mono[4000:-4000]).max() < 0.4


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match=r"nope\.wav"):
        A.load_audio(missing)
    with pytest.raises(FileNotFoundError):
        A.whisper_features(str(missing))


def test_non_audio_file(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"noise\.wav"):
        A.load_audio(path)
    with pytest.raises(ValueError):
        A.load_audio(b"not a media file at all")


def test_video_only_mp4(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(3):
            image = np.full((32, 32, 3), 60 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(ValueError, match="no audio stream"):
        A.load_audio(path)


def test_import_is_light():
    code = (
        "import sys, smart_turn_mm.audio; "
        "heavy = {'torch', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
