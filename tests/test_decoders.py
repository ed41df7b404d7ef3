"""Decoders kept from call to call (smart_turn_mm.decoders): the same frames as fresh ones."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
from media import face_frames, read_index, write_test_video

from smart_turn_mm import decoders as D
from smart_turn_mm import face as F
from smart_turn_mm import video as V
from smart_turn_mm.yuv import plane_array


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Three 2 s H.264 clips (B-frames, one keyframe) with different faces' positions, and
    one of another size."""
    root = tmp_path_factory.mktemp("decoders")
    frames = face_frames(60)
    paths = []
    for i, shift in enumerate((0, 40, 80)):
        path = root / f"clip{i}.mp4"
        write_test_video(path, [np.roll(f, shift, axis=1) for f in frames])
        paths.append(path)
    small = root / "small.mp4"
    write_test_video(small, face_frames(60, 128, 160, face=False))
    paths.append(small)
    return paths


@pytest.fixture(autouse=True)
def no_kept_decoders():
    """Every test starts and ends without decoders kept by another."""
    D.clear()
    yield
    D.clear()


def _fresh(path: Path) -> list[av.VideoFrame]:
    """Every frame, from a fresh decoder with PyAV's defaults."""
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def _assert_same_frames(ours: list[av.VideoFrame], theirs: list[av.VideoFrame]) -> None:
    assert [f.pts for f in ours] == [f.pts for f in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for pa, pb in zip(a.planes, b.planes, strict=True):
            np.testing.assert_array_equal(plane_array(pa), plane_array(pb))
        assert a.colorspace == b.colorspace


def test_a_kept_decoder_is_reused_and_decodes_as_a_fresh_one(clips):
    first = V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)
    assert len(D._idle) == 1
    kept = D._idle[0][1]
    second = V._decode(str(clips[1]), V.NUM_FRAMES, fast=True)  # same parameters
    assert len(D._idle) == 1 and D._idle[0][1] is kept
    _assert_same_frames(second.frames, _fresh(clips[1])[-V.NUM_FRAMES :])
    # The first call's frames are still intact: buffers in use are never handed out again.
    _assert_same_frames(first.frames, _fresh(clips[0])[-V.NUM_FRAMES :])


def test_a_full_decode_after_a_fast_one_skips_nothing(clips):
    V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)  # leaves skip_frame = NONREF behind
    full = V._decode(str(clips[0]), V.NUM_FRAMES, fast=False)
    assert full.num_decoded == 60
    _assert_same_frames(full.frames, _fresh(clips[0])[-V.NUM_FRAMES :])


def test_other_parameters_get_another_decoder(clips, monkeypatch):
    V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)
    V._decode(str(clips[3]), V.NUM_FRAMES, fast=True)  # another size
    assert len(D._idle) == 2 and D._idle[0][0] != D._idle[1][0]
    tail = V._decode(str(clips[3]), V.NUM_FRAMES, fast=True)
    assert [read_index(f.to_ndarray(format="rgb24")) for f in tail.frames] == list(range(28, 60))
    # At most MAX_IDLE are kept, and none whose buffers would be too big.
    monkeypatch.setattr(D, "MAX_IDLE", 1)
    V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)
    assert len(D._idle) == 1
    D.clear()
    monkeypatch.setattr(D, "MAX_IDLE_BYTES", 1000)
    V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)
    assert D._idle == []


def test_a_failed_decode_keeps_no_decoder(clips, tmp_path):
    data = clips[0].read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: len(data) * 2 // 3])
    try:
        V._decode(str(broken), V.NUM_FRAMES, fast=False)
    except ValueError:
        assert D._idle == []  # the decoder saw the error: not kept
    else:
        assert len(D._idle) == 1  # FFmpeg decoded what it could, without an error


def test_prepare_video_gives_the_same_tensor_again(clips):
    first = V.prepare_video(clips[0])
    second = V.prepare_video(clips[0])
    np.testing.assert_array_equal(first.pixel_values, second.pixel_values)
    # The tensor is the one made from a fresh decoder's frames.
    reference = F.crop_frames(_fresh(clips[0])[-V.NUM_FRAMES :], first.box, V.FRAME_SIZE)
    np.testing.assert_array_equal(first.pixel_values, V.normalize_clip(reference))


def test_concurrent_calls_equal_serial_calls(clips):
    serial = [V.prepare_video(p).pixel_values for p in clips * 2]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda p: V.prepare_video(p).pixel_values, clips * 2))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(serial[0], serial[1])  # the clips differ


def test_a_fallback_decode_keeps_the_right_frames(clips, monkeypatch):
    monkeypatch.setattr(V, "_window_start", lambda stream, n: 10**9)  # the seek overshoots
    tail = V._decode_tail(clips[0], V.NUM_FRAMES)
    assert [read_index(f.to_ndarray(format="rgb24")) for f in tail.frames] == list(range(28, 60))
