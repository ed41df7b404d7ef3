"""Decoded frames kept as numpy YUV planes in reused buffers (smart_turn_mm.yuv)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
from media import face_frames, read_index, write_test_video

from smart_turn_mm import face as F
from smart_turn_mm import video as V
from smart_turn_mm import yuv as Y


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Three 2 s H.264 clips (B-frames, one keyframe) with different faces' positions."""
    root = tmp_path_factory.mktemp("yuv")
    frames = face_frames(60)
    paths = []
    for i, shift in enumerate((0, 40, 80)):
        path = root / f"clip{i}.mp4"
        write_test_video(path, [np.roll(f, shift, axis=1) for f in frames])
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def no_idle_ring():
    """Every test starts and ends without a ring left over by another."""
    Y.FrameRing._idle = None
    yield
    Y.FrameRing._idle = None


def _decoded(path: Path, n: int = 5) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return [f for _, f in zip(range(n), container.decode(video=0), strict=False)]


def test_copies_equal_the_decoded_frames(clips):
    full = V._decode(str(clips[0]), V.NUM_FRAMES, fast=True)
    copied = V._decode(str(clips[0]), V.NUM_FRAMES, fast=True, copy=True)
    assert copied.ring is not None and full.ring is None
    assert all(isinstance(f, Y.YUVFrame) for f in copied.frames)
    assert [f.pts for f in copied.frames] == [f.pts for f in full.frames]
    for a, b in zip(copied.frames, full.frames, strict=True):
        for plane, view in zip(a.planes, b.planes, strict=True):
            np.testing.assert_array_equal(plane, Y.plane_array(view))
        # The same colour matrix: the RGB conversion is identical.
        np.testing.assert_array_equal(a.to_ndarray(format="rgb24"), b.to_ndarray(format="rgb24"))
    copied.release()
    assert copied.ring is None


def test_crop_of_copies_equals_crop_of_decoded_frames(clips):
    full = V._decode(str(clips[1]), V.NUM_FRAMES, fast=True)
    copied = V._decode(str(clips[1]), V.NUM_FRAMES, fast=True, copy=True)
    rgb = [f.to_ndarray(format="rgb24") for f in full.frames[:4]]
    for box in (F.FaceBox(41, 17, 141, 117, 1.0), F.FaceBox(40, 16, 140, 116, 1.0)):  # odd/even
        crops = F.crop_frames(full.frames, box, 64)
        np.testing.assert_array_equal(F.crop_frames(copied.frames, box, 64), crops)
        # The model's layout: the same pixels, as a contiguous (3, T, S, S) array.
        for frames, reference in ((copied.frames, crops), (rgb, F.crop_frames(rgb, box, 64))):
            planar = F.crop_frames(frames, box, 64, channels_first=True)
            assert planar.flags.c_contiguous and planar.shape == (3, len(frames), 64, 64)
            np.testing.assert_array_equal(planar, reference.transpose(3, 0, 1, 2))


def test_slots_rotate_and_keep_the_recent_frames():
    frames = _decoded_synthetic(5)
    ring = Y.FrameRing.acquire(frames[0], slots=3)
    assert ring is not None
    kept = [ring.keep(f) for f in frames]
    # A slot is overwritten 3 calls later: the last 2 frames (slots - 1) are intact.
    for k, f in zip(kept[-2:], frames[-2:], strict=True):
        np.testing.assert_array_equal(k.planes[0], Y.plane_array(f.planes[0]))
    assert kept[0].planes[0][0, 0] == kept[3].planes[0][0, 0] == 3  # slot 0, reused


def test_released_rings_are_reused_for_the_same_shape_only(monkeypatch):
    frames = _decoded_synthetic(2)
    ring = Y.FrameRing.acquire(frames[0], slots=4)
    ring.release()
    assert Y.FrameRing.acquire(frames[0], slots=4) is ring  # taken: no longer idle
    assert Y.FrameRing.acquire(frames[0], slots=4) is not ring
    ring.release()
    assert Y.FrameRing.acquire(frames[0], slots=5) is not ring  # another shape
    # Rings bigger than MAX_IDLE_BYTES are not kept.
    Y.FrameRing._idle = None
    monkeypatch.setattr(Y, "MAX_IDLE_BYTES", ring.nbytes - 1)
    ring.release()
    assert Y.FrameRing._idle is None


def test_other_formats_and_sizes_are_not_copied():
    rgb = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    assert Y.FrameRing.acquire(rgb, slots=2) is None
    frames = _decoded_synthetic(1)
    ring = Y.FrameRing.acquire(frames[0], slots=2)
    other = av.VideoFrame(64, 16, "yuv420p")
    assert ring.keep(other) is other


def test_odd_sizes_are_copied_whole():
    frame = av.VideoFrame.from_ndarray(
        np.random.default_rng(0).integers(0, 256, (15, 21, 3), dtype=np.uint8), format="rgb24"
    ).reformat(format="yuv420p")
    ring = Y.FrameRing.acquire(frame, slots=2)
    kept = ring.keep(frame)
    assert [p.shape for p in kept.planes] == [(15, 21), (8, 11), (8, 11)]
    np.testing.assert_array_equal(kept.to_ndarray(format="rgb24"), frame.to_ndarray(format="rgb24"))


def test_prepare_video_reuses_the_ring_and_gives_the_same_tensor(clips):
    first = V.prepare_video(clips[0]).pixel_values
    ring = Y.FrameRing._idle
    assert ring is not None  # released for the next call
    second = V.prepare_video(clips[0]).pixel_values
    assert Y.FrameRing._idle is ring
    np.testing.assert_array_equal(first, second)
    # The ring's tensor is the one made from the decoder's own frames.
    tail = V._decode_tail(clips[0], V.NUM_FRAMES)
    box = V.prepare_video(clips[0]).box
    reference = V.normalize_clip(F.crop_frames(tail.frames, box, V.FRAME_SIZE))
    np.testing.assert_array_equal(first, reference)


def test_concurrent_calls_equal_serial_calls(clips):
    serial = [V.prepare_video(p).pixel_values for p in clips * 2]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda p: V.prepare_video(p).pixel_values, clips * 2))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(serial[0], serial[1])  # the clips differ


def test_a_fallback_decode_keeps_the_right_frames(clips, monkeypatch):
    monkeypatch.setattr(V, "_window_start", lambda stream, n: 10**9)  # the seek overshoots
    tail = V._decode_tail(clips[0], V.NUM_FRAMES, copy=True)
    assert [read_index(f.to_ndarray(format="rgb24")) for f in tail.frames] == list(range(28, 60))
    tail.release()


def _decoded_synthetic(n: int) -> list[av.VideoFrame]:
    """``n`` yuv420p frames whose luma is the frame number."""
    out = []
    for i in range(n):
        frame = av.VideoFrame(32, 16, "yuv420p")
        for plane in frame.planes:
            Y.plane_array(plane)[...] = i
        out.append(frame)
    return out
