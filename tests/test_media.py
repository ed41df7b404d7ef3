"""The one writer of WAV and H.264 files: round trips through our own readers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from smart_turn_mm.audio import load_audio
from smart_turn_mm.media import open_media, write_video, write_wav
from smart_turn_mm.video import read_last_frames


def test_wav_round_trip(tmp_path):
    audio = (0.5 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    path = write_wav(tmp_path / "a.wav", audio)
    back = load_audio(path)
    assert back.shape == audio.shape
    assert np.abs(back - audio).max() < 1e-3
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temporary left behind


def test_video_with_audio(tmp_path):
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(12)]
    audio = np.zeros(16000, np.float32)
    path = write_video(tmp_path / "v.mp4", frames, fps=12, audio=audio)
    decoded, fps = read_last_frames(path, num_frames=32)
    assert len(decoded) == 12 and fps == pytest.approx(12)
    assert decoded[0].shape == (48, 64, 3)
    assert abs(len(load_audio(path)) - 16000) <= 1024  # AAC pads up to one frame


def test_bad_video_input(tmp_path):
    with pytest.raises(ValueError, match="even frame sizes"):
        write_video(tmp_path / "odd.mp4", [np.zeros((47, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / "none.mp4", [])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "s.wav", np.zeros((2, 100), np.float32))


def test_open_without_decoding_video_in_the_probe(tmp_path):
    """probe_video_frames=False: the same streams, sizes, rates, durations and MP4 decoding
    delay, the same decoded frames; only the pixel format waits for the first frame."""
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(24)]
    path = write_video(tmp_path / "v.mp4", frames, fps=12, audio=np.zeros(16000, np.float32))
    seen = []
    for probe in (True, False):
        with open_media(path, probe_video_frames=probe) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            codec = video.codec_context
            assert (video.format is None) == (not probe)  # until a frame is decoded
            seen.append(
                (
                    (codec.width, codec.height, video.average_rate, video.duration),
                    (audio.rate, audio.channels, container.duration, codec.reorder_depth),
                    [f.to_ndarray() for f in container.decode(video)],
                )
            )
    assert seen[0][:2] == seen[1][:2]
    assert len(seen[0][2]) == len(seen[1][2]) == 24
    for a, b in zip(seen[0][2], seen[1][2], strict=True):
        np.testing.assert_array_equal(a, b)
