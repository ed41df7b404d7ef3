"""Export a checkpoint to validated ONNX files: fp32 and int8 (static QDQ), combined and split.

``export_onnx`` writes into ``out_dir``:

- ``smart-turn-multimodal-gpu.onnx`` (fp32) and ``smart-turn-multimodal-cpu.onnx`` (int8):
  the published I/O (``input_features`` [B, 80, 800], ``pixel_values`` [B, 3, T, S, S] ->
  ``logits`` [B, 1], a probability: the graph applies the sigmoid), dynamic batch, one file
  each (no ``.onnx.data``). An audio-only model gives ``smart-turn-v3-{gpu,cpu}.onnx``
  (``input_features`` -> ``logits``, the Smart Turn v3 I/O).
- the split graphs of each combined file (:mod:`smart_turn_mm.graph_split`), so that an
  audio-only call runs the audio encoder and the head with the zero video embedding and never
  the video backbone;
- ``export-report.json`` and ``export-report.md``: the validation numbers, sizes, SHA-256s.

Every file carries ``metadata_props``: ``smart_turn_mm.version``, ``smart_turn_mm.model_config``
(JSON), ``smart_turn_mm.no_video = zero_embedding`` (missing video means the zero video
embedding, as in training; published files lack the key and mean zero pixels through the
backbone) and ``smart_turn_mm.precision`` (fp32 / int8).

Exporter: ``torch.onnx.export(dynamo=True, external_data=False)``. The TorchScript exporter
(``dynamo=False``) still works on torch 2.13 with the same parity, but it is deprecated ("will
be removed"), emits tracer warnings, and its graph carries about 160 extra Constant, Identity,
Shape and Gather nodes and 17 Concats (shape arithmetic); the dynamo graph has none of those and
a single Concat, at the fusion boundary. Node-level metadata (stack traces with local paths)
is stripped.

int8: ``onnxruntime.quantization`` static QDQ (``quant_pre_process``, then ``quantize_static``
with per-channel int8 weights) calibrated on REAL front-end outputs (:class:`CalibrationData`:
``whisper_features`` and ``prepare_video`` of dataset or given files), streamed through a
``CalibrationDataReader``; never random noise. MinMax (default) keeps two numbers per tensor;
Percentile feeds one sample per histogram pass. Default: only the ``Conv`` nodes of the video
branch (``DEFAULT_OP_TYPES``, ``DEFAULT_INT8_SCOPE``), U8S8 with 7-bit weights
(``DEFAULT_INT8_KERNEL``); the audio encoder and the head stay fp32, so the no-video path is
bit-identical to fp32. The R3D-18 backbone is about 81 of the model's 88 GFLOPs and QLinearConv
is where int8 pays, while the audio encoder's activations do not survive int8 (outliers:
pipecat's own v3.2 int8 file is up to 0.85 off its fp32 weights).

Measured on the published-size model (Smart Turn v3.2 audio weights, random video branch),
32 calibration and 60 hold-out clips of real speech (espeak-ng) with face video, 2-core AVX2:
the default gives 100% decision agreement (max |dp| 0.0013) and a 1.74x faster combined graph
(66.8 MB); every op type everywhere (ORT's default, 41.8 MB like the published file) agrees on
only 86.7% (85.0% with U8S8) of the clips, 95% without video. On the audio-only v3.2 model,
int8 in the encoder (MatMul, all ops, MinMax or Percentile, U8 or S8) agrees on 80-92%.
Validation runs on every export (hold-out samples never used for calibration): torch vs fp32
ONNX (max |dp| <= 1e-4), split vs combined graphs (<= 1e-6), fp32 vs int8 decision agreement
at 0.5 (>= 99%) and |dp|. A failed check raises :class:`ExportValidationError` after the files
and the report (status FAILED) are written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smart_turn_mm import graph_split
from smart_turn_mm.locations import atomic_path, sha256_file

if TYPE_CHECKING:
    import onnx
    import torch

    from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal

__all__ = [
    "CalibrationData",
    "CalibrationSample",
    "ExportReport",
    "ExportValidationError",
    "add_export_arguments",
    "export_onnx",
    "output_names",
    "run_export_from_args",
    "validate_export",
]

# Published file names (SPEC 4): "gpu" is fp32, "cpu" is int8.
MULTIMODAL_FP32 = "smart-turn-multimodal-gpu.onnx"
MULTIMODAL_INT8 = "smart-turn-multimodal-cpu.onnx"
AUDIO_ONLY_FP32 = "smart-turn-v3-gpu.onnx"
AUDIO_ONLY_INT8 = "smart-turn-v3-cpu.onnx"
REPORT_JSON = "export-report.json"
REPORT_MD = "export-report.md"

DEFAULT_OPSET = 18
# Quantised op types and where: only the video branch's Conv nodes (see the module docstring).
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv",)
INT8_SCOPES = ("video", "audio", "all")
DEFAULT_INT8_SCOPE = "video"
ACTIVATION_TYPES = ("quint8", "qint8")
# Integer kernels by model kind: (activation type, reduce_range). ONNX Runtime's U8S8 kernels
# on x86 CPUs without VNNI (AVX2) add int8 products in saturating 16-bit pairs; 7-bit weights
# (reduce_range) rule that out on every CPU at U8S8 speed. Measured on the published-size model
# (2-core AVX2 CPU, 60 real hold-out clips): video Convs U8S8 + reduce_range 1.74x faster than
# fp32, S8S8 only 1.17x, both 100% decision agreement. The audio-only model's only quantised
# nodes are the encoder's two stem Convs (no speed-up either way): S8S8 100% agreement, U8S8
# 91.7% (saturation), U8S8 + reduce_range 96.7%, on the real Smart Turn v3.2 weights.
DEFAULT_INT8_KERNEL = {"video": ("quint8", True), "audio_only": ("qint8", False)}
CALIBRATE_METHODS = ("minmax", "percentile")
DEFAULT_CALIBRATE_METHOD = "minmax"
# Calibration samples: MinMax keeps two numbers per tensor, so memory does not grow with this.
DEFAULT_NUM_CALIBRATION = 32
# Share of the selected samples held out (never calibrated on) to validate int8 against fp32.
DEFAULT_HOLDOUT_FRACTION = 0.25
# Hold-out samples used for validation at most (each costs a few full-model runs).
DEFAULT_MAX_VALIDATION = 32
# Percentile calibration keeps this share of each activation's histogram.
DEFAULT_PERCENTILE = 99.999

# Validation targets.
TORCH_TOLERANCE = 1e-4  # max |probability difference|, torch vs fp32 ONNX
SPLIT_TOLERANCE = 1e-6  # split graphs vs the combined graph
MIN_INT8_AGREEMENT = 0.99  # fp32 vs int8 decisions at DECISION_THRESHOLD
DECISION_THRESHOLD = 0.5
# Hold-out samples on which the split graphs are compared with the combined graph.
SPLIT_CHECK_SAMPLES = 3

# metadata_props keys.
META_VERSION = "smart_turn_mm.version"
META_CONFIG = "smart_turn_mm.model_config"
META_NO_VIDEO = "smart_turn_mm.no_video"
META_PRECISION = "smart_turn_mm.precision"
META_INT8 = "smart_turn_mm.int8"
NO_VIDEO_ZERO_EMBEDDING = "zero_embedding"


class ExportValidationError(RuntimeError):
    """An exported file failed validation; ``report`` holds the numbers (status FAILED)."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


def output_names(config: ModelConfig) -> dict[str, str]:
    """``{"fp32": file name, "int8": file name}`` for a model with or without video."""
    if config.with_video:
        return {"fp32": MULTIMODAL_FP32, "int8": MULTIMODAL_INT8}
    return {"fp32": AUDIO_ONLY_FP32, "int8": AUDIO_ONLY_INT8}


# --------------------------------------------------------------------------- calibration data


@dataclass(frozen=True)
class CalibrationSample:
    """One real example: an audio file and, optionally, its video clip.

    ``face_crop``: whether the video still needs the face crop (raw files) or is already a
    face-cropped dataset clip (SPEC 5).
    """

    audio: Path
    video: Path | None = None
    face_crop: bool = True
    label: bool | None = None

    def features(self, config: ModelConfig) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (1, 80, 800) log-mel and (1, 3, T, S, S) pixels (``None`` without video)."""
        from smart_turn_mm.audio import whisper_features

        x = whisper_features(self.audio)[None]
        if self.video is None or not config.with_video:
            return x, None
        from smart_turn_mm.video import prepare_video

        clip = prepare_video(
            self.video,
            face_crop=self.face_crop,
            num_frames=config.num_frames,
            size=config.frame_size,
        )
        return x, clip.pixel_values[None]


@dataclass(frozen=True)
class CalibrationData:
    """Real examples for int8 calibration and for validation (see :meth:`split`)."""

    samples: tuple[CalibrationSample, ...]
    source: str = "files"

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"no calibration samples ({self.source})")

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_dataset(cls, folder: str | os.PathLike) -> CalibrationData:
        """Samples from a prepared dataset folder (``metadata.jsonl`` + audio/ + video/, SPEC 5).

        Video clips there are already face-cropped (``face_crop=False``). Rows are taken in a
        fixed shuffled order, alternating complete and incomplete turns where labelled.
        """
        folder = Path(folder)
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"no metadata.jsonl in {folder} (expected a SPEC 5 dataset)")
        samples, missing = [], []
        for line_no, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                audio = folder / row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}:{line_no}: not a dataset row with file_name ({e})") from e
            video = folder / row["video_path"] if row.get("video_path") else None
            for path in (audio, video):
                if path is not None and not path.is_file():
                    missing.append(str(path))
            label = row.get("endpoint_bool")
            samples.append(CalibrationSample(audio, video, face_crop=False, label=label))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} files named in {meta} are missing, e.g. {missing[:3]}"
            )
        order = np.random.default_rng(0).permutation(len(samples))
        return cls(_interleave_labels([samples[i] for i in order]), source=str(folder))

    @classmethod
    def from_files(
        cls,
        audio: Sequence[str | os.PathLike],
        video: Sequence[str | os.PathLike] | None = None,
        *,
        face_crop: bool = True,
    ) -> CalibrationData:
        """Samples from audio files, each paired with the video file at the same position."""
        video = list(video or [])
        if video and len(video) != len(audio):
            raise ValueError(
                f"give one video per audio file or none: {len(audio)} audio, {len(video)} video"
            )
        samples = []
        for i, a in enumerate(audio):
            v = Path(video[i]) if video else None
            for path in (Path(a), v):
                if path is not None and not path.is_file():
                    raise FileNotFoundError(f"calibration file not found: {path}")
            samples.append(CalibrationSample(Path(a), v, face_crop=face_crop))
        return cls(tuple(samples), source="files")

    def split(
        self,
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
        max_calibration: int = DEFAULT_NUM_CALIBRATION,
        max_validation: int = DEFAULT_MAX_VALIDATION,
    ) -> tuple[CalibrationData, CalibrationData]:
        """(calibration, hold-out): disjoint; the hold-out is ``holdout_fraction`` of the samples
        (at least one, at most ``max_validation``), calibration the next ``max_calibration``."""
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if max_calibration < 1 or max_validation < 1:
            raise ValueError("max_calibration and max_validation must be >= 1")
        if len(self.samples) < 2:
            raise ValueError(
                f"need at least 2 samples (calibration + hold-out), got {len(self.samples)}"
            )
        n_hold = min(max_validation, max(1, round(len(self.samples) * holdout_fraction)))
        n_hold = min(n_hold, len(self.samples) - 1)
        # Hold-out from the end of the (already mixed) order, calibration from the start.
        hold = self.samples[len(self.samples) - n_hold :]
        calib = self.samples[: min(max_calibration, len(self.samples) - n_hold)]
        return (
            CalibrationData(calib, f"{self.source} (calibration)"),
            CalibrationData(hold, f"{self.source} (hold-out)"),
        )

    def with_video(self) -> CalibrationData | None:
        """The samples that have a video clip (``None`` when there are none)."""
        kept = tuple(s for s in self.samples if s.video is not None)
        return CalibrationData(kept, self.source) if kept else None


def _interleave_labels(samples: list[CalibrationSample]) -> tuple[CalibrationSample, ...]:
    """Alternate True / False / None labels, keeping each group's order."""
    groups: dict[Any, list[CalibrationSample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    queues = [iter(g) for g in groups.values()]
    out: list[CalibrationSample] = []
    while queues:
        for q in list(queues):
            item = next(q, None)
            if item is None:
                queues.remove(q)
            else:
                out.append(item)
    return tuple(out)


class _Reader:
    """``CalibrationDataReader`` that computes each sample's features when asked (streaming)."""

    def __init__(self, data: CalibrationData, config: ModelConfig) -> None:
        self.data, self.config = data, config
        self.position, self.end, self.seen = 0, len(data), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        x, pixels = self.data.samples[self.position].features(self.config)
        self.position += 1
        self.seen += 1
        feeds = {graph_split.AUDIO_INPUT: x}
        if self.config.with_video:
            if pixels is None:
                raise ValueError("a calibration sample of a video model has no video")
            feeds[graph_split.VIDEO_INPUT] = pixels
        return feeds

    def __len__(self) -> int:
        return len(self.data)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Used by ONNX Runtime to feed the samples in strides (``CalibStridedMinMax``)."""
        self.position, self.end = start_index, min(end_index, len(self.data))


def _process_peak_bytes() -> int:
    """This process's peak resident memory so far (``getrusage``; 0 where unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class _PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process's lifetime peak is the best there is
            return _process_peak_bytes()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> _PeakRss:
        self.peak_bytes = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())


# --------------------------------------------------------------------------- report


@dataclass
class ExportReport:
    """What an export wrote and how it validated (``export-report.json`` / ``.md``)."""

    status: str = "PASSED"
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    out_dir: str = ""
    library_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    exporter: str = ""
    opset: int | None = DEFAULT_OPSET
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "PASSED"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        lines = [f"# smart-turn-mm ONNX export: {self.status}", ""]
        for failure in self.failures:
            lines.append(f"- **FAILED**: {failure}")
        for warning in self.warnings:
            lines.append(f"- note: {warning}")
        if self.failures or self.warnings:
            lines.append("")
        lines += [
            f"- smart-turn-mm {self.library_version}; "
            + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
            f"- exporter: {self.exporter}; opset {self.opset}",
            "",
            "## Files",
            "",
            "| file | precision | part | MB | SHA-256 |",
            "|---|---|---|---:|---|",
        ]
        for name, info in self.files.items():
            lines.append(
                f"| {name} | {info.get('precision', '')} | {info.get('part', '')} | "
                f"{info['bytes'] / 1e6:.2f} | `{info['sha256']}` |"
            )
        if self.timings_s:
            lines += ["", "## Timings", ""]
            lines += [f"- {k}: {v:.2f} s" for k, v in self.timings_s.items()]
        if self.quantization:
            lines += ["", "## int8 quantisation", ""]
            lines += [f"- {k}: {_fmt(v)}" for k, v in self.quantization.items()]
        if self.validation:
            lines += ["", "## Validation", ""]
            rows = []
            for key, value in self.validation.items():
                if key in ("torch_vs_fp32", "split_vs_combined", "int8_vs_fp32"):
                    rows += _stat_rows(key, value)
                else:
                    lines.append(f"- {key}: {_fmt(value)}")
            lines += [
                "",
                "| check | mode | n | max abs dp | mean abs dp | agreement |",
                "|---|---|---:|---:|---:|---:|",
                *rows,
            ]
        lines += ["", f"```json\n{json.dumps(self.model_config, indent=1)}\n```", ""]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        _atomic_text(out_dir / REPORT_JSON, text)
        _atomic_text(out_dir / REPORT_MD, self.to_markdown())


def _stat_rows(check: str, stats: dict[str, Any]) -> list[str]:
    """Markdown table rows for ``{mode: stats}`` (or ``{precision: {mode: stats}}``)."""
    rows = []
    for mode, s in stats.items():
        if "count" not in s:
            rows += _stat_rows(f"{check} ({mode})", s)
        elif s["count"]:
            rows.append(
                f"| {check} | {mode} | {s['count']} | {s['max_abs_dp']:.3g} | "
                f"{s['mean_abs_dp']:.3g} | {s['agreement']:.1%} |"
            )
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "-"
    return str(value)


def _atomic_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _file_info(path: Path, precision: str, part: str) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "precision": precision,
        "part": part,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": {i.name: _shape(i) for i in model.graph.input},
        "outputs": {o.name: _shape(o) for o in model.graph.output},
    }


def _shape(info: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in info.type.tensor_type.shape.dim
    ]


# --------------------------------------------------------------------------- fp32 export


def _probability_module(model: SmartTurnMultimodal) -> torch.nn.Module:
    """The model with a sigmoid on its logits: the exported graphs output probabilities.

    The attribute is named ``inner`` like the published Smart Turn v3 exports, so initialiser
    names read ``inner.encoder...`` and :func:`smart_turn_mm.weights.smart_turn_onnx_state_dict`
    reads our files back.
    """
    import torch

    class AudioVisual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_features: torch.Tensor, pixel_values: torch.Tensor):
            return torch.sigmoid(self.inner(input_features, pixel_values))

    class AudioOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_features: torch.Tensor):
            return torch.sigmoid(self.inner(input_features))

    return (AudioVisual() if model.config.with_video else AudioOnly()).eval()


def _clean(model: onnx.ModelProto) -> None:
    """Drop node-level metadata and doc strings (exporter stack traces with local paths)."""

    def clean_graph(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for sub in graph_split._subgraphs(node):
                clean_graph(sub)
        for info in (*graph.input, *graph.output, *graph.value_info):
            del info.metadata_props[:]

    clean_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantiser's progress prints, log warnings and warnings.

    (torch.onnx prints progress and logs that torchvision ops are not registered; the ORT
    quantiser prints histogram progress and logs per-tensor notes on the root logger.)
    """
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _metadata(config: ModelConfig, precision: str, extra: dict[str, str] | None = None):
    from smart_turn_mm import __version__

    return [
        (META_VERSION, __version__),
        (META_CONFIG, json.dumps(config.to_dict(), sort_keys=True)),
        (META_NO_VIDEO, NO_VIDEO_ZERO_EMBEDDING),
        (META_PRECISION, precision),
        *(extra or {}).items(),
    ]


def _export_fp32(model: SmartTurnMultimodal, path: Path, opset: int) -> None:
    """torch -> single-file fp32 ONNX with the published I/O and a dynamic batch."""
    import onnx
    import torch

    cfg = model.config
    wrapper = _probability_module(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = torch.zeros(2, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    args: tuple[torch.Tensor, ...] = (x,)
    names = [graph_split.AUDIO_INPUT]
    if cfg.with_video:
        args = (x, torch.zeros(2, *cfg.video_shape))
        names.append(graph_split.VIDEO_INPUT)
    tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=".export-")
    tmp = Path(tmp_dir) / "model.onnx"
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                input_names=names,
                output_names=[graph_split.OUTPUT],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes={name: {0: batch} for name in names},
                verbose=False,
            )
        proto = onnx.load(str(tmp))
        _clean(proto)
        graph_split._set_metadata(proto, _metadata(cfg, "fp32"))
        onnx.checker.check_model(proto)
        graph_split.save_model_atomic(proto, path)
    finally:
        for leftover in Path(tmp_dir).iterdir():
            leftover.unlink()
        os.rmdir(tmp_dir)


# --------------------------------------------------------------------------- int8


def _quantize(
    fp32_path: Path,
    int8_path: Path,
    config: ModelConfig,
    calibration: CalibrationData,
    *,
    op_types: Sequence[str] | None,
    scope: str,
    method: str,
    activation_type: str,
    reduce_range: bool,
    percentile: float,
) -> dict[str, Any]:
    """Static QDQ int8 of ``fp32_path`` into ``int8_path``; returns what was done."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {CALIBRATE_METHODS}, got {method!r}")
    if scope not in INT8_SCOPES:
        raise ValueError(f"int8 scope must be one of {INT8_SCOPES}, got {scope!r}")
    if scope == "video" and not config.with_video:
        raise ValueError("int8 scope 'video' needs a model with video; use 'audio' or 'all'")
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(
            f"activation_type must be one of {ACTIVATION_TYPES}, got {activation_type!r}"
        )
    activation = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}[activation_type]
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".quant-") as tmp_dir:
        pre = Path(tmp_dir) / "pre.onnx"
        t0 = time.perf_counter()
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        model = onnx.load(str(pre))
        # Node names must be unique and non-empty for nodes_to_quantize.
        seen: set[str] = set()
        for i, node in enumerate(model.graph.node):
            if not node.name or node.name in seen:
                node.name = f"{node.op_type}_{i}"
            seen.add(node.name)
        nodes = _nodes_in_scope(model, scope, op_types)
        if not nodes:
            raise ValueError(
                f"nothing to quantise: no {list(op_types or ['any'])} nodes in scope {scope!r}"
            )
        onnx.save_model(model, str(pre))
        del model
        info["pre_process_s"] = time.perf_counter() - t0

        reader = _Reader(calibration, config)
        extra: dict[str, Any] = {}
        calibrate = CalibrationMethod.MinMax
        if method == "percentile":
            # Histograms need whole tensors: feed one sample per collection to bound memory.
            calibrate = CalibrationMethod.Percentile
            extra.update({"CalibStridedMinMax": 1, "CalibPercentile": percentile})
        t0 = time.perf_counter()
        with _PeakRss() as rss, _quiet():
            quantize_static(
                str(pre),
                str(Path(tmp_dir) / "int8.onnx"),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types) if op_types else None,
                nodes_to_quantize=nodes,
                calibrate_method=calibrate,
                extra_options=extra,
            )
        info["quantize_s"] = time.perf_counter() - t0
        quantized = onnx.load(str(Path(tmp_dir) / "int8.onnx"))
    record = {
        "format": "QDQ",
        "op_types": list(op_types) if op_types else "all",
        "scope": scope,
        "nodes_quantized": len(nodes),
        "activation_type": activation_type,
        "weight_type": "qint8 per-channel",
        "reduce_range": reduce_range,
        "calibrate_method": method + (f" ({percentile})" if method == "percentile" else ""),
        "calibration_samples": reader.seen,
        "calibration_source": calibration.source,
        "calibration_peak_rss_mb": round(rss.peak_bytes / 2**20, 1),
        "process_peak_rss_mb": round(_process_peak_bytes() / 2**20, 1),
    }
    _clean(quantized)
    meta = {k: v for k, v in record.items() if k not in ("calibration_peak_rss_mb",)}
    meta_props = _metadata(config, "int8", {META_INT8: json.dumps(meta, sort_keys=True)})
    graph_split._set_metadata(quantized, meta_props)
    graph_split.save_model_atomic(quantized, int8_path)
    return {**record, **info}


def _nodes_in_scope(
    model: onnx.ModelProto, scope: str, op_types: Sequence[str] | None
) -> list[str]:
    """Names of the nodes to quantise: of ``op_types`` (any when None) within ``scope``."""
    deps = graph_split.tensor_dependencies(model)
    wanted = {
        "video": {frozenset((graph_split.VIDEO_INPUT,))},
        "audio": {frozenset((graph_split.AUDIO_INPUT,))},
    }.get(scope)
    names = []
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        out = deps.get(node.output[0]) if node.output else None
        if wanted is None or out in wanted:
            names.append(node.name)
    return names


# --------------------------------------------------------------------------- validation


class _Graphs:
    """ONNX Runtime sessions of one precision: the combined graph and its split parts."""

    def __init__(self, combined: Path, parts: dict[str, Path] | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3

        def session(p: Path) -> Any:
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])

        self.combined = session(combined)
        self.parts = {k: session(v) for k, v in (parts or {}).items()}

    def full(self, x: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        feeds = {graph_split.AUDIO_INPUT: x}
        if pixels is not None:
            feeds[graph_split.VIDEO_INPUT] = pixels
        return self.combined.run(None, feeds)[0].reshape(-1)

    def split(self, x: np.ndarray, pixels: np.ndarray | None) -> np.ndarray:
        """head(audio(x), video(pixels)); ``pixels=None`` is the zero video embedding."""
        a = self.parts["audio"].run(None, {graph_split.AUDIO_INPUT: x})[0]
        if pixels is None:
            width = self.parts["head"].get_inputs()[1].shape[1]
            v = np.zeros((x.shape[0], width), np.float32)
        else:
            v = self.parts["video"].run(None, {graph_split.VIDEO_INPUT: pixels})[0]
        feeds = {graph_split.AUDIO_EMBEDDING: a, graph_split.VIDEO_EMBEDDING: v}
        return self.parts["head"].run(None, feeds)[0].reshape(-1)


def _torch_probability(
    model: SmartTurnMultimodal, x: np.ndarray, pixels: np.ndarray | None
) -> np.ndarray:
    import torch

    with torch.no_grad():
        px = None if pixels is None else torch.from_numpy(pixels)
        return torch.sigmoid(model(torch.from_numpy(x), px)).numpy().reshape(-1)


def _inputs(
    config: ModelConfig, holdout: CalibrationData | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Validation inputs: the hold-out's real features, else seeded random ones (parity only)."""
    if holdout is not None:
        for sample in holdout.samples:
            yield sample.features(config)
        return
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal((1, config.num_mel_bins, 2 * config.max_source_positions))
        px = rng.standard_normal((1, *config.video_shape)) if config.with_video else None
        yield x.astype(np.float32), None if px is None else px.astype(np.float32)


def _compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    if not a:
        return {"count": 0}
    pa, pb = np.concatenate(a), np.concatenate(b)
    diff = np.abs(pa - pb)
    agree = (pa > DECISION_THRESHOLD) == (pb > DECISION_THRESHOLD)  # as predict_endpoint decides
    return {
        "count": int(pa.size),
        "max_abs_dp": float(diff.max()),
        "mean_abs_dp": float(diff.mean()),
        "agreement": float(agree.mean()),
        "disagreements": int((~agree).sum()),
    }


def _validate(
    model: SmartTurnMultimodal,
    paths: dict[str, Path],
    splits: dict[str, dict[str, Path]],
    holdout: CalibrationData | None,
    *,
    torch_tolerance: float,
    split_tolerance: float,
    min_agreement: float,
    allow_int8_mismatch: bool,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Run every check; returns (numbers, failures, warnings)."""
    cfg = model.config
    graphs = {p: _Graphs(path, splits.get(p)) for p, path in paths.items()}
    # probs[(precision or "torch", mode)] -> list of (1,) arrays; modes below.
    probs: dict[tuple[str, str], list[np.ndarray]] = {}

    def add(key: tuple[str, str], value: np.ndarray) -> None:
        probs.setdefault(key, []).append(value)

    batch_inputs: list[tuple[np.ndarray, np.ndarray | None]] = []
    n_samples = n_video = 0
    for x, pixels in _inputs(cfg, holdout):
        n_samples += 1
        if len(batch_inputs) < 3:
            batch_inputs.append((x, pixels))
        if not cfg.with_video:
            add(("torch", "audio"), _torch_probability(model, x, None))
            for p, g in graphs.items():
                add((p, "audio"), g.full(x))
            continue
        # No video: the zero video embedding (torch with pixel_values=None; the split graphs).
        add(("torch", "no_video"), _torch_probability(model, x, None))
        for p, g in graphs.items():
            add((p, "no_video"), g.split(x, None))
        # The split graphs compute what the combined graph does (checked on a few samples:
        # the equality is structural); zero pixels is what published files mean by no video.
        check_split = n_samples <= SPLIT_CHECK_SAMPLES
        if check_split:
            zeros = np.zeros((1, *cfg.video_shape), np.float32)
            for p, g in graphs.items():
                add((p, "zero_pixels"), g.full(x, zeros))
                add((p, "zero_pixels_split"), g.split(x, zeros))
        if pixels is None:
            continue
        n_video += 1
        add(("torch", "av"), _torch_probability(model, x, pixels))
        for p, g in graphs.items():
            av = g.full(x, pixels)
            add((p, "av"), av)
            if check_split:
                add((p, "av_split_ref"), av)
                add((p, "av_split"), g.split(x, pixels))

    numbers: dict[str, Any] = {
        "inputs": holdout.source if holdout is not None else "seeded random (no real data given)",
        "samples": n_samples,
    }
    if cfg.with_video:
        numbers["samples_with_video"] = n_video
    failures: list[str] = []
    notes: list[str] = []
    modes = ("av", "no_video") if cfg.with_video else ("audio",)

    # 1. torch vs fp32 ONNX.
    parity = {m: _compare(probs.get(("torch", m), []), probs.get(("fp32", m), [])) for m in modes}
    # Dynamic batch: a batch of up to 3 samples vs the single runs.
    if cfg.with_video and batch_inputs and all(px is not None for _, px in batch_inputs):
        bx = np.concatenate([x for x, _ in batch_inputs])
        bp = np.concatenate([px for _, px in batch_inputs])  # type: ignore[misc]
        parity["batch"] = _compare(
            [_torch_probability(model, bx, bp)], [graphs["fp32"].full(bx, bp)]
        )
    elif batch_inputs:
        bx = np.concatenate([x for x, _ in batch_inputs])
        mode_batch = _torch_probability(model, bx, None)
        onnx_batch = graphs["fp32"].split(bx, None) if cfg.with_video else graphs["fp32"].full(bx)
        parity["batch"] = _compare([mode_batch], [onnx_batch])
    numbers["torch_vs_fp32"] = parity
    for mode, stats in parity.items():
        if stats["count"] and stats["max_abs_dp"] > torch_tolerance:
            failures.append(
                f"torch vs fp32 ONNX ({mode}): max |dp| {stats['max_abs_dp']:.3g} > "
                f"{torch_tolerance:g}"
            )

    # 2. split graphs vs the combined graph, per precision.
    if cfg.with_video:
        numbers["split_vs_combined"] = {}
        for p in graphs:
            stats = {
                "av": _compare(probs.get((p, "av_split"), []), probs.get((p, "av_split_ref"), [])),
                "zero_pixels": _compare(probs[(p, "zero_pixels_split")], probs[(p, "zero_pixels")]),
            }
            numbers["split_vs_combined"][p] = stats
            for mode, s in stats.items():
                if s["count"] and s["max_abs_dp"] > split_tolerance:
                    failures.append(
                        f"{p} split graphs vs combined ({mode}): max |dp| {s['max_abs_dp']:.3g}"
                        f" > {split_tolerance:g}"
                    )

    # 3. fp32 vs int8 decisions.
    if "int8" in graphs:
        agreement = {
            m: _compare(probs.get(("fp32", m), []), probs.get(("int8", m), [])) for m in modes
        }
        numbers["int8_vs_fp32"] = agreement
        if holdout is None:
            notes.append("int8 was not compared on real data (no hold-out samples)")
        for mode, s in agreement.items():
            if not s["count"]:
                notes.append(f"int8 vs fp32 ({mode}): no hold-out samples for this mode")
                continue
            if s["count"] < 20:
                notes.append(
                    f"int8 vs fp32 ({mode}): only {s['count']} hold-out samples; the agreement "
                    "rate is coarse"
                )
            if s["agreement"] < min_agreement:
                message = (
                    f"int8 vs fp32 ({mode}): decisions agree on {s['agreement']:.1%} of "
                    f"{s['count']} hold-out samples (< {min_agreement:.0%}; max |dp| "
                    f"{s['max_abs_dp']:.3g}). Try other --op-types / --int8-scope, more "
                    "calibration data, or --allow-int8-mismatch to keep the file anyway"
                )
                (notes if allow_int8_mismatch else failures).append(message)
    return numbers, failures, notes


def validate_export(
    out_dir: str | os.PathLike,
    model: SmartTurnMultimodal,
    holdout: CalibrationData | None = None,
    *,
    torch_tolerance: float = TORCH_TOLERANCE,
    split_tolerance: float = SPLIT_TOLERANCE,
    min_agreement: float = MIN_INT8_AGREEMENT,
    allow_int8_mismatch: bool = False,
    precisions: Sequence[str] = ("fp32", "int8"),
    report: ExportReport | None = None,
) -> ExportReport:
    """Validate the files of an export directory against ``model``; write the report.

    ``holdout`` should be samples that calibration never saw. ``precisions``: which of the
    fp32 / int8 files to check (those present). Raises
    :class:`ExportValidationError` (after writing the report, status FAILED) when a check fails.
    """
    out = Path(out_dir)
    names = output_names(model.config)
    paths = {p: out / n for p, n in names.items() if p in precisions and (out / n).is_file()}
    if "fp32" not in paths:
        raise FileNotFoundError(f"no {names['fp32']} in {out}")
    splits = {}
    if model.config.with_video:
        for p, path in paths.items():
            split = graph_split.split_paths(path)
            missing = [str(s) for s in split.values() if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"split graphs missing: {missing}")
            splits[p] = split
    if report is None:
        report = _new_report(model, out, None)
        report.exporter = "(validate_export of existing files)"
    t0 = time.perf_counter()
    numbers, failures, notes = _validate(
        model,
        paths,
        splits,
        holdout,
        torch_tolerance=torch_tolerance,
        split_tolerance=split_tolerance,
        min_agreement=min_agreement,
        allow_int8_mismatch=allow_int8_mismatch,
    )
    report.timings_s["validate"] = time.perf_counter() - t0
    report.validation = {
        "thresholds": {
            "torch_vs_fp32_max_abs_dp": torch_tolerance,
            "split_vs_combined_max_abs_dp": split_tolerance,
            "int8_min_agreement": min_agreement,
            "decision_threshold": DECISION_THRESHOLD,
        },
        **numbers,
    }
    report.failures = failures
    report.warnings = [*report.warnings, *notes]
    report.files = {}
    for p, path in paths.items():
        report.files[path.name] = _file_info(path, p, "combined")
        for part, split_path in splits.get(p, {}).items():
            report.files[split_path.name] = _file_info(split_path, p, part)
    extra = sorted(q.name for q in out.iterdir() if q.name.endswith(".onnx.data"))
    if extra:
        failures.append(f"external data files present: {extra}")
    report.opset = report.files[paths["fp32"].name]["opset"]
    report.status = "FAILED" if failures else "PASSED"
    report.write(out)
    if failures:
        raise ExportValidationError(
            f"ONNX export in {out} FAILED validation: " + "; ".join(failures), report
        )
    return report


def _new_report(model: SmartTurnMultimodal, out: Path, opset: int | None) -> ExportReport:
    import onnx
    import onnxruntime
    import torch

    from smart_turn_mm import __version__

    return ExportReport(
        out_dir=str(out),
        library_version=__version__,
        versions={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        model_config=model.config.to_dict(),
        exporter="torch.onnx.export(dynamo=True, external_data=False) + sigmoid",
        opset=opset,
    )


# --------------------------------------------------------------------------- the export


def export_onnx(
    source: SmartTurnMultimodal | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    calibration: CalibrationData | None = None,
    quantize: bool = True,
    opset: int = DEFAULT_OPSET,
    op_types: Sequence[str] | None = DEFAULT_OP_TYPES,
    int8_scope: str | None = None,
    calibrate_method: str = DEFAULT_CALIBRATE_METHOD,
    max_calibration: int = DEFAULT_NUM_CALIBRATION,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    max_validation: int = DEFAULT_MAX_VALIDATION,
    activation_type: str | None = None,
    reduce_range: bool | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    torch_tolerance: float = TORCH_TOLERANCE,
    min_agreement: float = MIN_INT8_AGREEMENT,
    allow_int8_mismatch: bool = False,
) -> ExportReport:
    """Export a checkpoint (directory, file, Hub id) or a model to validated ONNX files.

    Args:
        source: a :class:`~smart_turn_mm.model.SmartTurnMultimodal` or anything
            :func:`~smart_turn_mm.weights.load_pretrained` reads.
        out_dir: where the files go (created; existing files of the same names are replaced).
        calibration: real examples (:class:`CalibrationData`); split into calibration and
            hold-out (validation) samples. Required for int8; without it (``quantize=False``)
            torch vs fp32 parity is checked on seeded random inputs.
        quantize: also write the int8 file.
        opset: ONNX opset of the fp32 graph.
        op_types: op types to quantise (``None``: every type ONNX Runtime can quantise).
        int8_scope: ``"video"`` (the video branch only; the default for video models),
            ``"audio"`` or ``"all"`` (the default for audio-only models).
        calibrate_method: ``"minmax"`` or ``"percentile"``.
        max_calibration: calibration samples at most.
        holdout_fraction: share of the samples held out for validation.
        max_validation: hold-out samples at most.
        activation_type: ``"quint8"`` (U8S8) or ``"qint8"`` (S8S8); ``None``: by model kind
            (``DEFAULT_INT8_KERNEL``).
        reduce_range: 7-bit weights (no U8S8 saturation on x86 CPUs without VNNI); ``None``:
            by model kind.
        percentile: for ``calibrate_method="percentile"``.
        torch_tolerance: max |dp| allowed between torch and fp32 ONNX.
        min_agreement: fp32 vs int8 decision agreement required on the hold-out.
        allow_int8_mismatch: keep a low int8 agreement as a warning instead of a failure.

    Returns:
        the :class:`ExportReport` (also written as ``export-report.json`` / ``.md``).

    Raises:
        ExportValidationError: a validation check failed (files and report are kept).
        ValueError: bad arguments, or int8 without calibration data.
    """
    from smart_turn_mm.model import SmartTurnMultimodal
    from smart_turn_mm.weights import load_pretrained

    t_start = time.perf_counter()
    if quantize and calibration is None:
        raise ValueError(
            "int8 export needs real calibration data (a dataset folder or audio/video files): "
            "pass calibration=CalibrationData.from_dataset(...) / .from_files(...), or "
            "quantize=False. Random noise is not used for calibration."
        )
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    model = source if isinstance(source, SmartTurnMultimodal) else load_pretrained(source)
    was_training = model.training
    device = next(model.parameters()).device
    model.cpu().eval()  # exported and compared on the CPU
    cfg = model.config
    scope = int8_scope or (DEFAULT_INT8_SCOPE if cfg.with_video else "all")
    kernel = DEFAULT_INT8_KERNEL["video" if cfg.with_video else "audio_only"]
    out = Path(out_dir)
    graph_split._writable_dir(out)
    names = output_names(cfg)
    report = _new_report(model, out, opset)

    calib: CalibrationData | None = None
    holdout: CalibrationData | None = None
    if calibration is not None:
        if cfg.with_video:
            # A video model calibrates and validates on samples with video (the hold-out's
            # no-video check uses their audio alone).
            usable = calibration.with_video()
            if usable is None:
                raise ValueError(
                    f"none of the {len(calibration)} calibration samples has a video clip; a "
                    "video model needs real clips to calibrate and validate its video branch"
                )
            calibration = usable
        calib, holdout = calibration.split(holdout_fraction, max_calibration, max_validation)
    try:
        paths = {"fp32": out / names["fp32"]}
        t0 = time.perf_counter()
        _export_fp32(model, paths["fp32"], opset)
        report.timings_s["export_fp32"] = time.perf_counter() - t0
        if quantize:
            assert calib is not None
            paths["int8"] = out / names["int8"]
            report.quantization = _quantize(
                paths["fp32"],
                paths["int8"],
                cfg,
                calib,
                op_types=op_types,
                scope=scope,
                method=calibrate_method,
                activation_type=activation_type or kernel[0],
                reduce_range=kernel[1] if reduce_range is None else reduce_range,
                percentile=percentile,
            )
            report.timings_s["quantize_int8"] = report.quantization.pop("quantize_s")
            report.timings_s["quant_pre_process"] = report.quantization.pop("pre_process_s")
        else:
            stale = out / names["int8"]
            if stale.is_file():
                report.warnings.append(f"{stale.name} from an earlier export was left in place")
        if cfg.with_video:
            t0 = time.perf_counter()
            for path in paths.values():
                graph_split.split_combined(path)
            report.timings_s["split"] = time.perf_counter() - t0
        if not quantize:
            report.warnings.append("no int8 file (quantize=False)")
        report.timings_s["total_before_validation"] = time.perf_counter() - t_start
        return validate_export(
            out,
            model,
            holdout,
            precisions=tuple(paths),
            torch_tolerance=torch_tolerance,
            min_agreement=min_agreement,
            allow_int8_mismatch=allow_int8_mismatch,
            report=report,
        )
    finally:
        model.to(device).train(was_training)


# --------------------------------------------------------------------------- command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``export_onnx.py`` and ``smart-turn-mm export``."""
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory, weights file or Hub repo id"
    )
    parser.add_argument("--out", required=True, help="output directory")
    data = parser.add_argument_group("calibration data (real examples; needed for int8)")
    data.add_argument(
        "--calibration-dir", help="prepared dataset folder (metadata.jsonl + audio/ + video/)"
    )
    data.add_argument("--audio", nargs="+", default=[], help="audio files")
    data.add_argument("--video", nargs="+", default=[], help="video files, one per audio file")
    data.add_argument(
        "--no-face-crop", action="store_true", help="the --video files are already face-cropped"
    )
    q = parser.add_argument_group("int8")
    q.add_argument("--no-int8", action="store_true", help="write the fp32 file only")
    q.add_argument(
        "--op-types",
        default=",".join(DEFAULT_OP_TYPES),
        help="comma-separated op types to quantise, or 'all' (default: %(default)s)",
    )
    q.add_argument(
        "--int8-scope",
        choices=INT8_SCOPES,
        default=None,
        help="which branch to quantise (default: video for video models, all for audio-only)",
    )
    q.add_argument(
        "--calibrate-method", choices=CALIBRATE_METHODS, default=DEFAULT_CALIBRATE_METHOD
    )
    q.add_argument(
        "--num-calibration",
        type=int,
        default=DEFAULT_NUM_CALIBRATION,
        help="calibration samples at most (default: %(default)s)",
    )
    q.add_argument(
        "--holdout-fraction",
        type=float,
        default=DEFAULT_HOLDOUT_FRACTION,
        help="share of samples held out for validation (default: %(default)s)",
    )
    q.add_argument(
        "--activation-type",
        choices=ACTIVATION_TYPES,
        default=None,
        help="int8 activations: quint8 (U8S8) or qint8 (S8S8) (default: quint8 with "
        "--reduce-range for video models, qint8 for audio-only models)",
    )
    q.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights: no U8S8 saturation on x86 CPUs without VNNI (default: by model kind)",
    )
    q.add_argument(
        "--allow-int8-mismatch",
        action="store_true",
        help="keep an int8 file whose decisions agree with fp32 less than required",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _op_types(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "all":
        return None
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    if not types:
        raise ValueError("--op-types is empty (give e.g. Conv,MatMul or 'all')")
    return types


def run_export_from_args(args: argparse.Namespace) -> int:
    """Run an export from parsed arguments; 0 when it passed, 1 when validation failed."""
    calibration = None
    try:
        if args.calibration_dir and (args.audio or args.video):
            raise ValueError("give either --calibration-dir or --audio/--video, not both")
        if args.calibration_dir:
            calibration = CalibrationData.from_dataset(args.calibration_dir)
        elif args.audio:
            calibration = CalibrationData.from_files(
                args.audio, args.video, face_crop=not args.no_face_crop
            )
        elif args.video:
            raise ValueError("--video needs --audio (one audio file per video file)")
        report = export_onnx(
            args.checkpoint,
            args.out,
            calibration=calibration,
            quantize=not args.no_int8,
            opset=args.opset,
            op_types=_op_types(args.op_types),
            int8_scope=args.int8_scope,
            calibrate_method=args.calibrate_method,
            max_calibration=args.num_calibration,
            holdout_fraction=args.holdout_fraction,
            activation_type=args.activation_type,
            reduce_range=args.reduce_range,
            allow_int8_mismatch=args.allow_int8_mismatch,
        )
    except ExportValidationError as e:
        _print_report(e.report, args.json)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_report(report, args.json)
    return 0


def _print_report(report: ExportReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"export {report.status}: {report.out_dir}")
    for name, info in report.files.items():
        if info["part"] == "combined":
            print(f"  {name}: {info['bytes'] / 1e6:.1f} MB  sha256 {info['sha256'][:16]}...")
    parity = report.validation.get("torch_vs_fp32", {})
    for mode, s in parity.items():
        if s.get("count"):
            print(f"  torch vs fp32 ({mode}): max |dp| {s['max_abs_dp']:.2e}")
    for mode, s in report.validation.get("int8_vs_fp32", {}).items():
        if s.get("count"):
            print(
                f"  int8 vs fp32 ({mode}): agreement {s['agreement']:.1%} of {s['count']}, "
                f"max |dp| {s['max_abs_dp']:.3f}"
            )
    for note in report.warnings:
        print(f"  note: {note}")
    print(f"  report: {Path(report.out_dir) / REPORT_MD}")
