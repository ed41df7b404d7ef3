"""The video front end: tail decoding, padding, normalisation, crops and input errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from media import face_frames, read_index, write_audio_only, write_test_video

from smart_turn_mm import face as F
from smart_turn_mm import video as V
from smart_turn_mm.decoders import decoder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """H.264 (with B-frames) at 30 fps: 10 s at 160 x 128 (frame indices only), also with a
    keyframe every second and AAC audio; 3 s and 20 frames at 320 x 240 with a face; and
    broken files."""
    root = tmp_path_factory.mktemp("clips")
    small = face_frames(300, 128, 160, face=False)
    frames = face_frames(90)
    paths = {name: root / f"{name}.mp4" for name in ("long", "short3s", "tiny", "gop30")}
    write_test_video(paths["long"], small)
    write_test_video(paths["gop30"], small, gop_size=30, audio=True)
    write_test_video(paths["short3s"], frames)
    write_test_video(paths["tiny"], frames[:20])
    data = paths["short3s"].read_bytes()
    paths["truncated"] = root / "truncated.mp4"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["random"] = root / "random.mp4"
    paths["random"].write_bytes(np.random.default_rng(0).bytes(20_000))
    paths["audio"] = root / "audio.m4a"
    write_audio_only(paths["audio"])
    paths["cover"] = root / "cover.mp3"
    write_audio_only(paths["cover"], cover_art=True)
    return paths


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["long", "gop30", "short3s"])
def test_read_last_frames_returns_the_last_32(clips, name):
    total, shape = (90, (240, 320, 3)) if name == "short3s" else (300, (128, 160, 3))
    frames, fps = V.read_last_frames(clips[name])
    assert fps == 30.0
    assert len(frames) == V.NUM_FRAMES
    assert all(f.shape == shape and f.dtype == np.uint8 for f in frames)
    assert [read_index(f) for f in frames] == list(range(total - V.NUM_FRAMES, total))


def test_read_last_frames_of_a_short_clip(clips):
    frames, _ = V.read_last_frames(clips["tiny"])
    assert [read_index(f) for f in frames] == list(range(20))


@pytest.mark.parametrize("name", ["long", "gop30"])
def test_long_files_are_not_decoded_whole(clips, name):
    tail = V._decode_tail(clips[name], V.NUM_FRAMES)
    assert tail.seeked
    # Only the frames from the keyframe before the tail (libx264's default keyframe interval
    # is 250 frames; gop30 has one every 30), less those skipped as unreferenced.
    assert V.NUM_FRAMES <= tail.num_decoded <= (60 if name == "long" else 80)


@pytest.mark.parametrize("name", ["long", "gop30", "short3s"])
def test_fast_tail_equals_a_full_decode(clips, name):
    fast = V._decode(str(clips[name]), V.NUM_FRAMES, fast=True)
    margin = V._decode(str(clips[name]), V.NUM_FRAMES, fast=True, exact_start=False)
    full = V._decode(str(clips[name]), V.NUM_FRAMES, fast=False)
    assert full.num_decoded == (90 if name == "short3s" else 300)
    # The exact window start also skips the unreferenced frames of the seek margin.
    assert fast.num_decoded < margin.num_decoded < full.num_decoded
    for tail in (fast, margin):
        assert [f.pts for f in tail.frames] == [f.pts for f in full.frames]
        for a, b in zip(tail.frames, full.frames, strict=True):
            np.testing.assert_array_equal(
                a.to_ndarray(format="rgb24"), b.to_ndarray(format="rgb24")
            )


def _pyav_frames(path: Path) -> list[tuple[int, np.ndarray]]:
    """Every frame as PyAV decodes it with its own defaults: (pts, YUV planes)."""
    import av

    with av.open(str(path)) as container:
        return [(f.pts, f.to_ndarray()) for f in container.decode(video=0)]


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_tail_decoding_threads_follow_the_slices(tmp_path, slices):
    import av

    path = tmp_path / f"slices{slices}.mp4"
    write_test_video(path, face_frames(90, 96, 128, face=False), slices=slices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = list(container.demux(stream))
        packet = packets[0]
        assert V._h264_slices(packet, stream.codec_context.extradata) == slices
        threads = V._threads(stream.codec_context, packet)
        assert threads == min(slices, os.cpu_count() or 1)
        with decoder(stream.codec_context, threads) as codec:
            assert codec.thread_count == threads
            assert codec.thread_type.name == ("SLICE" if threads > 1 else "NONE")
            decoded = [f for p in packets for f in codec.decode(p)]
        assert len(decoded) == 90  # the codec opened with these threads
    # Whatever the threads, the tail is what PyAV's own full decode gives, pixel for pixel.
    tail = V._decode(str(path), V.NUM_FRAMES, fast=True)
    full = _pyav_frames(path)[-V.NUM_FRAMES :]
    assert [f.pts for f in tail.frames] == [pts for pts, _ in full]
    for frame, (_, pixels) in zip(tail.frames, full, strict=True):
        np.testing.assert_array_equal(frame.to_ndarray(), pixels)


def test_face_cropping_decodes_with_one_thread_beside_the_detector(tmp_path, monkeypatch):
    """prepare_video detects faces on a worker thread while decoding: its decoder gets one
    thread even for a multi-slice stream; without face detection it gets slice threads."""
    from smart_turn_mm import decoders

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    path = tmp_path / "slices2.mp4"
    write_test_video(path, face_frames(60, 96, 128, face=False), slices=2)
    used = []
    real = decoders.decoder

    def spy(codec, threads=1):
        used.append(threads)
        return real(codec, threads)

    monkeypatch.setattr(V, "decoder", spy)
    with_face = V.prepare_video(path).pixel_values
    without = V.prepare_video(path, face_crop=False).pixel_values
    assert used == [1, 2]
    assert with_face.shape == without.shape == (3, V.NUM_FRAMES, V.FRAME_SIZE, V.FRAME_SIZE)


def test_h264_slices_in_annex_b():
    aud, sps, idr, non_idr, sei = b"\x09\xf0", b"\x67\x42", b"\x65\x88", b"\x41\x9a", b"\x06\x05"
    unit = b"".join(b"\x00\x00\x00\x01" + n for n in (aud, sps, sei, idr, idr))
    assert V._h264_slices(unit, None) == 2
    assert V._h264_slices(b"\x00\x00\x01" + non_idr + b"\x00\x00\x01" + aud, b"") == 1


def test_probe_skipped_only_for_mp4(clips, tmp_path):
    import av

    mkv = tmp_path / "long.mkv"
    with av.open(str(clips["long"])) as src, av.open(str(mkv), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    assert V._is_iso_media(str(clips["long"])) and not V._is_iso_media(str(mkv))
    assert not V._is_iso_media(str(tmp_path / "missing.mp4"))
    frames, _ = V.read_last_frames(mkv)
    assert [read_index(f) for f in frames] == list(range(300 - V.NUM_FRAMES, 300))


def test_a_wrong_duration_falls_back_to_a_full_decode(clips, monkeypatch):
    # A container that claims a much longer duration: the seek lands past the end.
    monkeypatch.setattr(V, "_window_start", lambda stream, n: 10**9)
    frames, _ = V.read_last_frames(clips["short3s"])
    assert [read_index(f) for f in frames] == list(range(58, 90))


# --------------------------------------------------------------------------- tensors


def test_pad_frames_repeats_the_last_frame():
    frames = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8)
    padded = V.pad_frames(frames, 8)
    assert padded.shape == (8, 2, 2, 3)
    assert [int(f[0, 0, 0]) for f in padded] == [0, 1, 2, 3, 4, 4, 4, 4]
    assert [int(f[0, 0, 0]) for f in V.pad_frames(frames, 3)] == [2, 3, 4]
    assert V.pad_frames(list(range(3)), 5) == [0, 1, 2, 2, 2]
    assert V.pad_frames(list(range(6)), 4) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="at least one frame"):
        V.pad_frames([], 4)


def test_normalize_clip_values_and_layout():
    clip = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    clip[1, 2, 3] = (255, 0, 128)
    out = V.normalize_clip(clip)
    assert out.shape == (3, 2, 4, 4) and out.dtype == np.float32
    mean, std = np.asarray(V.KINETICS_MEAN), np.asarray(V.KINETICS_STD)
    expected = (np.array([255, 0, 128]) / 255.0 - mean) / std
    np.testing.assert_allclose(out[:, 1, 2, 3], expected, rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0, 0], -mean / std, rtol=1e-6)
    assert out[0, 1, 2, 3] == pytest.approx((1 - 0.43216) / 0.22803)
    # Every value, computed in float32: within 3e-7 of the float64 formula.
    levels = np.arange(256, dtype=np.uint8)[None, :, None, None].repeat(3, axis=3)
    exact = (levels / 255.0 - mean) / std
    np.testing.assert_allclose(V.normalize_clip(levels)[:, 0, :, 0], exact[0, :, 0].T, atol=3e-7)
    with pytest.raises(TypeError, match="uint8"):
        V.normalize_clip(clip.astype(np.float32))
    # The model's layout in: the same values.
    planar = np.ascontiguousarray(clip.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(V.normalize_clip(planar, channels_first=True), out)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        V.normalize_clip(clip, channels_first=True)


def test_prepare_video_from_a_file(clips):
    clip = V.prepare_video(clips["short3s"])
    assert clip.pixel_values.shape == (3, 32, 112, 112)
    assert clip.pixel_values.dtype == np.float32
    assert clip.face_found and clip.fps == 30.0 and clip.num_source_frames == 32
    # face_frames puts the face (about 45 x 57 px) near x 145, y 175 of the 320 x 240 frame.
    box = clip.box
    assert 60 < box.side < 110 and 120 < (box.x0 + box.x1) / 2 < 175
    assert 150 < (box.y0 + box.y1) / 2 < 200 and box.y1 <= 240
    np.testing.assert_array_equal(V.video_tensor(clips["short3s"]), clip.pixel_values)


def test_prepare_video_pads_a_short_clip(clips):
    clip = V.prepare_video(clips["tiny"])
    assert clip.num_source_frames == 20 and clip.pixel_values.shape == (3, 32, 112, 112)
    last = clip.pixel_values[:, 19]
    for t in range(20, 32):
        np.testing.assert_array_equal(clip.pixel_values[:, t], last)
    assert not np.array_equal(clip.pixel_values[:, 18], last)


def test_file_and_frames_give_nearly_the_same_tensor(clips):
    """From a file, frames are cropped in YUV (never converted whole to RGB); from RGB frames
    they are converted first. Same face box; tensors within 0.03 on average (about 1.7 grey
    levels: the full-frame conversion is about 1 level darker), 99% of values within 0.1
    (5.6 levels), and at least as close to the frames that were encoded."""
    frames, _ = V.read_last_frames(clips["short3s"])
    from_file = V.prepare_video(clips["short3s"])
    from_frames = V.prepare_video(frames)
    assert from_frames.box == from_file.box and from_frames.fps is None
    assert from_frames.face_found and from_file.face_found
    diff = np.abs(from_file.pixel_values - from_frames.pixel_values)
    assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.1
    source = face_frames(90)[-V.NUM_FRAMES :]
    truth = V.normalize_clip(F.crop_frames(source, from_file.box, V.FRAME_SIZE))
    error_file = np.abs(from_file.pixel_values - truth).mean()
    assert error_file <= np.abs(from_frames.pixel_values - truth).mean()
    as_array = V.prepare_video(np.stack(frames))
    np.testing.assert_array_equal(as_array.pixel_values, from_frames.pixel_values)
    # Without the face crop, the same: the centre square.
    centre_file = V.prepare_video(clips["short3s"], face_crop=False)
    centre_frames = V.prepare_video(frames, face_crop=False)
    assert centre_file.box == centre_frames.box == F.center_box(240, 320)
    diff = np.abs(centre_file.pixel_values - centre_frames.pixel_values)
    assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.1


class _RecordingDetector:
    """The real detector, recording which frame (by its stamped index) each call saw, on
    which thread, and whether two calls ever overlapped."""

    def __init__(self) -> None:
        self.detector = F.default_detector()
        self.calls: list[tuple[int, str]] = []
        self.threads: list[threading.Thread] = []
        self.busy = False
        self.overlapped = False

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        self.overlapped |= self.busy
        self.busy = True
        try:
            self.calls.append((read_index(rgb), threading.current_thread().name))
            self.threads.append(threading.current_thread())
            return self.detector.detect(rgb)
        finally:
            self.busy = False


def test_file_detection_runs_while_decoding(clips):
    recorder = _RecordingDetector()
    clip = V.prepare_video(clips["short3s"], detector=recorder)  # type: ignore[arg-type]
    # First, middle and last frame of the clip (58, 74, 89), in order and one at a time; the
    # first two on the worker thread, while the decoder went on.
    assert [index for index, _ in recorder.calls] == [58, 74, 89]
    assert [name.startswith("smart_turn_mm-face") for _, name in recorder.calls] == [
        True,
        True,
        False,
    ]
    assert not recorder.overlapped
    frames, _ = V.read_last_frames(clips["short3s"])
    assert clip.box == F.clip_face_box(frames)[0]


def test_the_detection_worker_is_kept_per_calling_thread(clips):
    """One worker thread per calling thread, kept between clips; it ends with the caller."""

    def workers(recorder: _RecordingDetector) -> set[threading.Thread]:
        return {t for t in recorder.threads if t.name.startswith("smart_turn_mm-face")}

    first, second = _RecordingDetector(), _RecordingDetector()
    V.prepare_video(clips["short3s"], detector=first)  # type: ignore[arg-type]
    V.prepare_video(clips["short3s"], detector=second)  # type: ignore[arg-type]
    (ours,) = workers(first)
    assert workers(second) == {ours}  # the same thread, kept

    other = _RecordingDetector()
    caller = threading.Thread(
        target=V.prepare_video, args=(clips["short3s"],), kwargs={"detector": other}
    )
    caller.start()
    caller.join()
    (theirs,) = workers(other)
    assert theirs is not ours  # the other caller's own worker
    theirs.join(timeout=10)  # ends once its caller has gone
    assert not theirs.is_alive()
    assert ours.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_detection_worker_is_replaced_in_a_forked_child(clips):
    # The child process makes its worker (a clip decoded) before it forks.
    code = (
        "import os, sys\n"
        "from smart_turn_mm import video as V\n"
        f"V.prepare_video({str(clips['short3s'])!r})\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    clip = V.prepare_video({str(clips['short3s'])!r})\n"
        "    os._exit(0 if clip.face_found else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    # A child that reused the parent's (dead) worker would wait for it forever.
    done = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0


def test_file_detection_after_a_fallback_decode(clips, monkeypatch):
    # A wrong duration: the guesses match no frame of the window, which is detected anyway.
    monkeypatch.setattr(V, "_window_start", lambda stream, n: 10**9)
    recorder = _RecordingDetector()
    clip = V.prepare_video(clips["short3s"], detector=recorder)  # type: ignore[arg-type]
    assert [index for index, _ in recorder.calls[-3:]] == [58, 74, 89]
    assert clip.box == F.clip_face_box(V.read_last_frames(clips["short3s"])[0])[0]


def test_short_file_detection(clips):
    recorder = _RecordingDetector()
    clip = V.prepare_video(clips["tiny"], detector=recorder)  # type: ignore[arg-type]
    assert [index for index, _ in recorder.calls] == [0, 10, 19]
    assert clip.face_found and clip.num_source_frames == 20


def test_odd_frame_sizes_in_memory():
    frames = face_frames(40, 479, 639, scale=1.0)
    clip = V.prepare_video(frames)
    assert clip.face_found and clip.num_source_frames == 32
    assert clip.pixel_values.shape == (3, 32, 112, 112)
    assert clip.box.x1 <= 639 and clip.box.y1 <= 479


def test_face_crop_false_takes_the_centre_square():
    frames = face_frames(8, 240, 320)
    clip = V.prepare_video(frames, face_crop=False)
    assert not clip.face_found and clip.box == F.center_box(240, 320)
    expected = V.normalize_clip(
        V.pad_frames(F.crop_frames(frames, F.center_box(240, 320), V.FRAME_SIZE), V.NUM_FRAMES)
    )
    np.testing.assert_array_equal(clip.pixel_values, expected)


def test_no_face_falls_back_to_the_centre_square():
    frames = face_frames(32, 240, 320, face=False)
    clip = V.prepare_video(frames)
    assert not clip.face_found and clip.box == F.center_box(240, 320)


def test_custom_sizes():
    frames = face_frames(10, 240, 320)
    out = V.video_tensor(frames, num_frames=4, size=64)
    assert out.shape == (3, 4, 64, 64)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found"):
        V.prepare_video(tmp_path / "missing.mp4")


@pytest.mark.parametrize("name", ["random", "truncated"])
def test_unreadable_files(clips, name):
    with pytest.raises(ValueError, match=rf"cannot (read|decode) video file .*{name}\.mp4"):
        V.read_last_frames(clips[name])


@pytest.mark.parametrize("name", ["audio", "cover"])
def test_audio_only_files(clips, name):
    with pytest.raises(ValueError, match="has no video stream"):
        V.prepare_video(clips[name])


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        ([], ValueError, "zero frames"),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "zero frames"),
        ([np.zeros((8, 8), np.uint8)], ValueError, r"RGB frames of shape \(H, W, 3\)"),
        ([np.zeros((8, 8, 1), np.uint8)], ValueError, r"RGB frames of shape \(H, W, 3\)"),
        ([np.zeros((8, 8, 4), np.uint8)], ValueError, r"RGB frames of shape \(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), ValueError, r"\(T, H, W, 3\)"),
        (
            [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)],
            ValueError,
            "same size",
        ),
        ([np.zeros((8, 8, 3), np.float32)], TypeError, "uint8.*float32"),
        ([[[0, 0, 0]]], TypeError, "numpy array"),
        (42, TypeError, "path or a sequence"),
    ],
)
def test_bad_frames(frames, error, match):
    with pytest.raises(error, match=match):
        V.prepare_video(frames)


def test_import_is_cheap():
    code = (
        "import sys, smart_turn_mm.video, smart_turn_mm.face\n"
        "heavy = {'torch', 'transformers', 'cv2', 'PIL', 'av', 'onnxruntime'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
