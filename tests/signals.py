"""Synthetic test signals shared by the test suite (no data files needed)."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: float32 ``(round(seconds * sr),)``, peak about 0.5.

    A glottal-like harmonic tone (f0 around 140 Hz with 5 Hz vibrato and a slow drift,
    harmonics falling 6 dB/octave up to 4 kHz) under a syllable-rate (about 4 Hz) amplitude
    envelope with pauses, plus a little broadband noise. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    f0 = 140.0 + 25.0 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 2 * np.pi))
    f0 += 4.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = np.zeros(n)
    for k in range(1, 4000 // 165 + 1):
        voice += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)), 0.0, None)
    pauses = (np.sin(2 * np.pi * 0.4 * t) > -0.7).astype(np.float64)
    signal = voice * syllables * pauses + 0.02 * rng.standard_normal(n)
    return (0.5 * signal / max(np.abs(signal).max(), 1e-9)).astype(np.float32)
