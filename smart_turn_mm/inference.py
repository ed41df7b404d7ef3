"""Inference with ONNX Runtime: model resolution, cached sessions and ``predict_endpoint``.

numpy, onnxruntime and PyAV only (no torch, no transformers). Three kinds of model files run:

* Smart Turn v3 audio-only files (``input_features`` -> ``logits``), e.g. the v3.2 file shipped
  in the ``pipecat-ai`` wheel;
* combined multimodal files with the published I/O (``input_features``, ``pixel_values`` ->
  ``logits``): the published ``smart-turn-multimodal-{gpu,cpu}.onnx`` and our own exports;
* the split of a combined file (``<stem>.audio.onnx``, ``<stem>.video.onnx``,
  ``<stem>.head.onnx``), which our exporter writes beside each combined file, so audio-only calls
  never run the video backbone. For a combined file without them the split is made once (needs
  the ``onnx`` package) and cached.

No video means the zero video embedding for our models (metadata
``smart_turn_mm.no_video=zero_embedding``). Published files lack that key: their no-video
behaviour is the backbone run on all-zero pixels, computed once per session as a constant.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.audio import N_FRAMES, N_MELS, whisper_features
from smart_turn_mm.locations import atomic_path, cache_dir, find_smart_turn_v3_onnx

__all__ = [
    "HUB_REPOS",
    "MODEL_ENV",
    "EndpointResult",
    "ModelNotFoundError",
    "TurnModel",
    "load_model",
    "predict_endpoint",
    "resolve_model_path",
]

MODEL_ENV = "SMART_TURN_MM_MODEL"
# Hub repositories and the files tried in each, in order (first the multimodal model).
HUB_REPOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "susuROBO/smart-turn-multimodal",
        ("smart-turn-multimodal-cpu.onnx", "smart-turn-multimodal-gpu.onnx"),
    ),
    ("pipecat-ai/smart-turn-v3", ("smart-turn-v3.2-cpu.onnx", "smart-turn-v3.2-gpu.onnx")),
)
# File names looked for in a model directory, per precision ("gpu" files are fp32).
DIR_CANDIDATES = {
    "fp32": (
        "smart-turn-multimodal-gpu.onnx",
        "smart-turn-v3-gpu.onnx",
        "smart-turn-v3.2-gpu.onnx",
    ),
    "int8": (
        "smart-turn-multimodal-cpu.onnx",
        "smart-turn-v3-cpu.onnx",
        "smart-turn-v3.2-cpu.onnx",
    ),
}
NO_VIDEO_KEY = "smart_turn_mm.no_video"
SPLIT_PARTS = ("audio", "video", "head")


class ModelNotFoundError(FileNotFoundError):
    """No model file could be found; the message lists every place that was tried."""


@dataclass(frozen=True)
class EndpointResult(Mapping[str, Any]):
    """The decision for one turn. Reads like the published ``{"prediction", "probability"}``
    dict (``result["probability"]``, ``dict(result)``) and carries more.
    """

    prediction: int
    probability: float
    used_video: bool = False
    face_found: bool | None = None
    model: str = ""
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    _KEYS = ("prediction", "probability", "used_video", "face_found", "model", "timings_ms")

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


# --------------------------------------------------------------------------- resolution


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _pick_in_dir(directory: Path, precision: str) -> Path | None:
    order = [precision] if precision in DIR_CANDIDATES else []
    order += [p for p in ("int8", "fp32") if p not in order]
    for prec in order:
        for name in DIR_CANDIDATES[prec]:
            if (directory / name).is_file():
                return directory / name
    plain = sorted(
        p
        for p in directory.glob("*.onnx")
        if not p.name.endswith(tuple(f".{s}.onnx" for s in SPLIT_PARTS))
    )
    return plain[0] if len(plain) == 1 else None


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """A cheap DNS look-up, so offline machines skip the Hub at once instead of retrying."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hub_download(repo: str, filename: str, *, local_only: bool) -> Path:
    """One file of a Hub repo: from the local cache (``local_only``) or downloaded."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # the inference install: plain HTTPS into our cache
        import urllib.request

        target = cache_dir() / "hub" / repo.replace("/", "--") / filename
        if target.is_file():
            return target
        if local_only:
            raise FileNotFoundError(f"{target} not cached") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
        with (
            atomic_path(target, suffix=".part") as tmp,
            urllib.request.urlopen(url, timeout=30) as response,
            open(tmp, "wb") as out,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
        return target
    return Path(hf_hub_download(repo, filename, local_files_only=local_only))


def _from_hub(candidates: list[tuple[str, str]], tried: list[str]) -> Path | None:
    """The first (repo, file) found in the cache, else the first that downloads."""
    for repo, name in candidates:
        try:
            return _hub_download(repo, name, local_only=True)
        except Exception:  # not cached
            pass
    if not _hub_reachable():
        tried.append(
            "Hugging Face Hub: offline (not cached: "
            + ", ".join(f"{r}/{n}" for r, n in candidates)
            + ")"
        )
        return None
    for repo, name in candidates:
        try:
            return _hub_download(repo, name, local_only=False)
        except Exception as e:  # missing file, auth, network: try the next one
            tried.append(f"hub {repo}/{name}: {type(e).__name__}: {str(e)[:80]}")
    return None


def resolve_model_path(model: str | os.PathLike | None = None, *, precision: str = "auto") -> Path:
    """Find the model file: an explicit file or directory, else ``$SMART_TURN_MM_MODEL``, else the
    Hugging Face Hub (multimodal, then Smart Turn v3), else the v3.2 file in ``pipecat-ai``.

    ``precision`` ("auto", "fp32" or "int8") picks among a directory's files; "auto" is fp32
    when CUDA is available, int8 otherwise. Raises ``ModelNotFoundError`` listing what was tried.
    """
    if precision not in ("auto", "fp32", "int8"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'int8', got {precision!r}")
    if precision == "auto":
        precision = "fp32" if _cuda_available() else "int8"
    tried: list[str] = []

    def from_local(candidate: Path, origin: str) -> Path | None:
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            found = _pick_in_dir(candidate, precision)
            if found is not None:
                return found
            tried.append(f"{origin}: directory {candidate} has no Smart Turn .onnx file")
            return None
        tried.append(f"{origin}: {candidate} does not exist")
        return None

    if model is not None:
        found = from_local(Path(model), "explicit path")
        if found is None and not Path(model).exists() and str(model).count("/") == 1:
            repo = str(model)  # maybe a Hub repo id
            names = dict.fromkeys(DIR_CANDIDATES[precision] + DIR_CANDIDATES["int8"])
            found = _from_hub([(repo, n) for n in names], tried)
        if found is None:
            raise ModelNotFoundError("no Smart Turn model found; tried:\n  " + "\n  ".join(tried))
        return found
    env = os.environ.get(MODEL_ENV)
    if env:
        found = from_local(Path(env), f"${MODEL_ENV}")
        if found is not None:
            return found
    else:
        tried.append(f"${MODEL_ENV} is not set")
    candidates = [
        (repo, name)
        for repo, names in HUB_REPOS
        for name in sorted(names, key=lambda n: ("gpu" in n) == (precision == "int8"))
    ]
    found = _from_hub(candidates, tried)
    if found is not None:
        return found
    bundled = find_smart_turn_v3_onnx()
    if bundled is not None:
        return bundled
    tried.append("pipecat-ai package: not installed (pip install pipecat-ai ships smart-turn-v3.2)")
    raise ModelNotFoundError("no Smart Turn model found; tried:\n  " + "\n  ".join(tried))


# --------------------------------------------------------------------------- sessions


def _session(path: Path, providers: tuple[str, ...], threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # Idle worker threads sleep instead of spinning: a live agent shares the CPU with VAD, STT...
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:
        raise ValueError(f"cannot load ONNX model {path}: {e}") from e


def _input_dims(session: Any, name: str) -> list[Any]:
    for inp in session.get_inputs():
        if inp.name == name:
            return list(inp.shape)
    raise ValueError(f"model has no input {name!r}")


class TurnModel:
    """A loaded Smart Turn ONNX model (audio-only, combined, or split), ready to run.

    Thread-safe: ONNX Runtime sessions may be run from several threads at once.
    """

    def __init__(self, path: Path, providers: tuple[str, ...], threads: int | None) -> None:
        self.path = Path(path)
        self.providers = providers
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._split_paths: dict[str, Path] = {}
        main = _session(self.path, providers, threads)
        names = {i.name for i in main.get_inputs()}
        outputs = [o.name for o in main.get_outputs()]
        if "input_features" not in names or "logits" not in outputs:
            raise ValueError(
                f"{self.path} is not a Smart Turn model: inputs {sorted(names)}, outputs {outputs} "
                "(expected input_features [and pixel_values] -> logits)"
            )
        extra = names - {"input_features", "pixel_values"}
        if extra:
            raise ValueError(f"{self.path} has unexpected inputs {sorted(extra)}")
        dims = _input_dims(main, "input_features")
        if dims[1:] != [N_MELS, N_FRAMES]:
            raise ValueError(f"{self.path}: input_features must be [B, 80, 800], file says {dims}")
        meta = main.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        self.has_video = "pixel_values" in names
        self.no_video = meta.get(NO_VIDEO_KEY, "zero_pixels") if self.has_video else "none"
        self.video_shape: tuple[int, ...] | None = None
        self._zero_pixel_embedding: np.ndarray | None = None
        self._lock = threading.Lock()
        if not self.has_video:
            self._sessions["audio_only"] = main
            return
        self.video_shape = tuple(int(d) for d in _input_dims(main, "pixel_values")[1:])
        split = _find_or_make_split(self.path)
        if split is None:  # no split possible: run the whole graph (correct, slower)
            self._sessions["combined"] = main
        else:
            del main
            self._split_paths = dict(split)
            for part in SPLIT_PARTS:
                self._sessions[part] = _session(split[part], providers, threads)

    # -- parts ------------------------------------------------------------------------------

    @property
    def split(self) -> bool:
        return "head" in self._sessions

    @property
    def num_frames(self) -> int | None:
        return None if self.video_shape is None else self.video_shape[1]

    @property
    def frame_size(self) -> int | None:
        return None if self.video_shape is None else self.video_shape[2]

    def _check_features(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim == 2:
            features = features[None]
        if features.ndim != 3 or features.shape[1:] != (N_MELS, N_FRAMES):
            raise ValueError(
                f"input_features must have shape (B, {N_MELS}, {N_FRAMES}), got {features.shape}"
            )
        if features.dtype != np.float32:
            raise TypeError(f"input_features must be float32, got {features.dtype}")
        return features

    def check_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Validate a preprocessed clip (3,T,H,W) or batch (B,3,T,H,W) for this model."""
        if not self.has_video or self.video_shape is None:
            raise ValueError(f"{self.path.name} is an audio-only model: it takes no video")
        pixels = np.asarray(pixel_values)
        if pixels.ndim == 4:
            pixels = pixels[None]
        if pixels.ndim != 5 or pixels.shape[1:] != self.video_shape:
            raise ValueError(
                f"pixel_values must have shape (B, {', '.join(map(str, self.video_shape))}), "
                f"got {pixels.shape}"
            )
        if pixels.dtype != np.float32:
            raise TypeError(f"pixel_values must be float32, got {pixels.dtype}")
        return pixels

    def audio_embedding(self, features: np.ndarray, *, beside_video: bool = False) -> np.ndarray:
        """(B, 80, 800) -> (B, d) audio embedding (split models only).

        ``beside_video``: the video branch runs on another thread meanwhile; on the CPU the
        audio graph then gets a session of its own with one thread (created on first use), so
        that it fills the cores the backbone leaves idle instead of contending for them.
        """
        session = self._audio_beside_video() if beside_video else self._sessions["audio"]
        return session.run(None, {"input_features": self._check_features(features)})[0]

    def _audio_beside_video(self) -> Any:
        # The backbone keeps 2 cores only ~85 % busy (1.39 s CPU in 0.82 s, int8); a 1-thread
        # audio graph beside it costs the call nothing measurable, where the 2-thread session
        # run beside the video preparation cost ~100 ms (benchmarks/RESULTS.md).
        if self.threads == 1 or self.providers[0] != "CPUExecutionProvider":
            return self._sessions["audio"]
        with self._lock:
            if "audio_beside_video" not in self._sessions:
                path = self._split_paths["audio"]
                self._sessions["audio_beside_video"] = _session(path, self.providers, 1)
            return self._sessions["audio_beside_video"]

    def video_embedding(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, T, H, W) -> (B, v) video embedding (split models only)."""
        return self._sessions["video"].run(None, {"pixel_values": self.check_pixels(pixel_values)})[
            0
        ]

    def no_video_embedding(self, batch: int) -> np.ndarray:
        """The embedding this model uses for 'no video': zeros, or (published files) the
        backbone's output for all-zero pixels, computed once."""
        width = self._sessions["head"].get_inputs()[1].shape[1]
        if self.no_video == "zero_embedding":
            return np.zeros((batch, int(width)), np.float32)
        with self._lock:
            if self._zero_pixel_embedding is None:
                zeros = np.zeros((1, *self.video_shape), np.float32)  # type: ignore[misc]
                self._zero_pixel_embedding = self.video_embedding(zeros)
        return np.repeat(self._zero_pixel_embedding, batch, axis=0)

    def head(self, audio_embedding: np.ndarray, video_embedding: np.ndarray | None) -> np.ndarray:
        """Fusion + classifier -> probabilities (B,); ``None`` = no video."""
        if video_embedding is None:
            video_embedding = self.no_video_embedding(audio_embedding.shape[0])
        feeds = {"audio_embedding": audio_embedding, "video_embedding": video_embedding}
        return self._sessions["head"].run(None, feeds)[0].reshape(-1)

    def predict(self, features: np.ndarray, pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (B,) for features (B, 80, 800) and optional clips (B, 3, T, H, W)."""
        features = self._check_features(features)
        if not self.has_video:
            if pixel_values is not None:
                raise ValueError(f"{self.path.name} is an audio-only model: it takes no video")
            out = self._sessions["audio_only"].run(None, {"input_features": features})[0]
            return out.reshape(-1)
        pixels = None if pixel_values is None else self.check_pixels(pixel_values)
        if pixels is not None and pixels.shape[0] != features.shape[0]:
            raise ValueError(
                f"batch mismatch: {features.shape[0]} features, {pixels.shape[0]} clips"
            )
        if self.split:
            if pixels is None:
                return self.head(self.audio_embedding(features), None)
            # The audio graph (one thread) beside the video graph, which this thread runs.
            audio = _pool("audio").submit(self.audio_embedding, features, beside_video=True)
            try:
                video = self.video_embedding(pixels)
            finally:
                audio_embedding = audio.result()
            return self.head(audio_embedding, video)
        if pixels is None:
            if self.no_video != "zero_pixels":
                raise ValueError(
                    f"{self.path.name} needs its split files for audio-only calls "
                    "(re-export, or install `onnx` so they can be made)"
                )
            pixels = np.zeros((features.shape[0], *self.video_shape), np.float32)  # type: ignore[misc]
        feeds = {"input_features": features, "pixel_values": pixels}
        return self._sessions["combined"].run(None, feeds)[0].reshape(-1)

    def __repr__(self) -> str:
        kind = "multimodal" if self.has_video else "audio-only"
        return (
            f"TurnModel({str(self.path)!r}, {kind}, split={self.split}, providers={self.providers})"
        )


def _find_or_make_split(path: Path) -> dict[str, Path] | None:
    """The split files of a combined graph: beside it, in the cache, or made now (needs onnx)."""
    from smart_turn_mm import graph_split

    beside = graph_split.split_paths(path)
    if all(p.is_file() for p in beside.values()):
        return beside
    stat = path.stat()
    cache = cache_dir() / "split" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    cached = graph_split.split_paths(path, cache)
    if all(p.is_file() for p in cached.values()):
        return cached
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    return graph_split.split_combined(path, cache)


_POOLS: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str) -> ThreadPoolExecutor:
    """A named pool of worker threads (made on first use): ``video`` runs video branches beside
    the audio path; ``audio`` runs audio graphs beside a video graph (its tasks never wait on
    other tasks, so callers on any thread cannot deadlock)."""
    with _MODELS_LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"smart-turn-{name}"
            )
        return _POOLS[name]


@dataclass(frozen=True)
class _VideoBranch:
    pixels: np.ndarray | None  # None: no face found (= no video)
    embedding: np.ndarray | None  # split models: the video embedding, else None
    face_found: bool | None
    prepare_ms: float
    model_ms: float


def _video_branch(turn_model: TurnModel, video: Any, face_crop: bool) -> _VideoBranch:
    """Prepare the video and, for split models, run the video graph (on a worker thread)."""
    start = time.perf_counter()
    pixels, face_found = _prepare_pixels(turn_model, video, face_crop)
    if face_crop and face_found is False:
        pixels = None  # no face = no video: the model's no-video embedding (SPEC 2)
    prepared = time.perf_counter()
    embedding = None
    if turn_model.split and pixels is not None:
        embedding = turn_model.video_embedding(pixels)
    end = time.perf_counter()
    return _VideoBranch(
        pixels, embedding, face_found, (prepared - start) * 1e3, (end - prepared) * 1e3
    )


_MODELS: dict[tuple[str, tuple[str, ...], int | None], TurnModel] = {}
_MODELS_LOCK = threading.Lock()


def default_providers() -> tuple[str, ...]:
    """CUDA first when this onnxruntime build has it, then CPU."""
    if _cuda_available():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def load_model(
    model: str | os.PathLike | TurnModel | None = None,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    precision: str = "auto",
) -> TurnModel:
    """Resolve and load a model; sessions are created once per (path, providers, threads)."""
    if isinstance(model, TurnModel):
        return model
    path = resolve_model_path(model, precision=precision).resolve()
    provs = tuple(providers) if providers else default_providers()
    key = (str(path), provs, threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = TurnModel(path, provs, threads)
        return _MODELS[key]


# --------------------------------------------------------------------------- predict


def _prepare_pixels(
    turn_model: TurnModel, video: Any, face_crop: bool
) -> tuple[np.ndarray, bool | None]:
    """Any accepted video form -> (1, 3, T, H, W) float32 and whether a face was found."""
    if isinstance(video, np.ndarray) and video.dtype == np.float32 and video.ndim in (4, 5):
        return turn_model.check_pixels(video), None  # already preprocessed
    from smart_turn_mm.video import prepare_video

    clip = prepare_video(
        video,
        face_crop=face_crop,
        num_frames=turn_model.num_frames,
        size=turn_model.frame_size,
    )
    return clip.pixel_values[None], clip.face_found


def predict_endpoint(
    audio: np.ndarray | str | os.PathLike | bytes,
    video: Any = None,
    *,
    model: str | os.PathLike | TurnModel | None = None,
    threshold: float = 0.5,
    sample_rate: int = 16000,
    face_crop: bool = True,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> EndpointResult:
    """Is the turn complete? Audio (array at ``sample_rate``, or a file) plus optional video.

    ``video``: None; a file path; RGB uint8 frames as a (T, H, W, 3) array or a list of
    (H, W, 3) arrays; or a preprocessed float32 (1, 3, T, H, W) / (3, T, H, W) clip. With an
    audio-only model, video is ignored (``used_video`` is False). ``threshold`` turns the
    probability into ``prediction`` (1 = complete). When face cropping finds no face in the
    clip, the call is treated as having no video (SPEC 2): ``face_found`` is False and
    ``used_video`` False.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    t0 = time.perf_counter()
    turn_model = load_model(model, providers=providers, threads=threads)
    t1 = time.perf_counter()
    # The video branch (decode, crop and, for split models, the video graph) runs on a worker
    # thread while this one computes the audio features and embedding: PyAV and ONNX Runtime
    # release the GIL, and the audio graph fills the cores the backbone leaves idle.
    pending = None
    if video is not None and turn_model.has_video:
        pending = _pool("video").submit(_video_branch, turn_model, video, face_crop)
    try:
        features = whisper_features(audio, sample_rate=sample_rate)[None]
        t2 = time.perf_counter()
        audio_embedding = None
        if turn_model.split:
            audio_embedding = turn_model.audio_embedding(features, beside_video=pending is not None)
        t_audio = time.perf_counter()
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    branch = None if pending is None else pending.result()
    pixels = None if branch is None else branch.pixels
    t3 = time.perf_counter()
    if audio_embedding is not None:
        video_embedding = None if branch is None else branch.embedding
        probability = float(turn_model.head(audio_embedding, video_embedding)[0])
    else:
        probability = float(turn_model.predict(features, pixels)[0])
    t4 = time.perf_counter()
    video_model_ms = 0.0 if branch is None else branch.model_ms
    timings = {
        "load_ms": (t1 - t0) * 1e3,
        "audio_features_ms": (t2 - t1) * 1e3,
        "video_ms": 0.0 if branch is None else branch.prepare_ms,  # worker thread, overlapped
        # ONNX Runtime: audio graph + video graph (worker thread, overlapped) + head/whole graph
        "model_ms": ((t_audio - t2) + (t4 - t3)) * 1e3 + video_model_ms,
        "total_ms": (t4 - t1) * 1e3,
    }
    return EndpointResult(
        prediction=int(probability > threshold),
        probability=probability,
        used_video=pixels is not None,
        face_found=None if branch is None else branch.face_found,
        model=turn_model.path.name,
        timings_ms=timings,
    )
