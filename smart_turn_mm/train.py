"""Training: one :func:`train` function for the script, the CLI and Modal (SPEC 6).

The recipe, two stages:

1. the audio branch (Whisper encoder, attention pooling AND the classifier) frozen; the video
   branch and the fusion layer trained (AdamW, lr 5e-4, 1 epoch). The frozen audio embeddings
   are deterministic, so they are computed once per segment and cached (``cache_frozen_audio``);
2. everything trained with a FRESH optimizer (lr 1e-5, 3 epochs).

Loss: BCE with logits, ``pos_weight = #neg / #pos`` of each batch clamped to [0.1, 10]. Warm-up
then cosine decay of the learning rate within each stage. Data: see :mod:`smart_turn_mm.mixing`
(split by recording BEFORE any oversampling).

Runs on CPU, on one GPU (bf16/fp16 autocast) and under ``torchrun`` (DDP, detected from
``WORLD_SIZE``; only rank 0 logs and saves; evaluation is sharded over ranks). Checkpoints are
atomic (:mod:`smart_turn_mm.checkpoints`) and hold the position inside the epoch, so
``resume=True`` continues mid-stage and loses only the steps since the last checkpoint.

Outputs in ``output_dir``: ``train_config.json``, ``log.jsonl`` (every logged step and
evaluation), ``checkpoints/``, the final model in ``model/`` (config, weights, training config
and metrics), ``metrics.json`` and, per held-out set, ``eval/<name>/`` (per-sample CSV, ROC, PR
and confusion-matrix plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smart_turn_mm.dataset import Segment, label_counts, load_audio_dataset, load_folder
from smart_turn_mm.distributed import (
    Runtime,
    gather_objects,
    get_rng_state,
    set_rng_state,
    setup_runtime,
)
from smart_turn_mm.evaluate import (
    EvaluationReport,
    Scores,
    TorchScorer,
    autocast,
    autocast_dtype,
    cached_audio_embeddings,
    score_segments,
    summarize,
    write_report,
)
from smart_turn_mm.mixing import check_disjoint, drop_unlabelled, mix_training_set, split_by_group
from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal, config_from_dict
from smart_turn_mm.runlog import RunLog

__all__ = [
    "MODEL_PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "add_train_arguments",
    "build_model",
    "config_from_args",
    "model_config_from",
    "prepare_data",
    "run_train_from_args",
    "set_stage",
    "train",
]


def _tiny_video() -> ModelConfig:
    """The published audio branch (so Smart Turn v3 weights fit) with the tiny video branch."""
    tiny = ModelConfig.tiny()
    return dataclasses.replace(
        ModelConfig.published(),
        video_widths=tiny.video_widths,
        video_dim=tiny.video_dim,
        num_frames=tiny.num_frames,
        frame_size=tiny.frame_size,
    )


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "published": ModelConfig.published,
    "audio-only": ModelConfig.audio_only,
    "tiny": ModelConfig.tiny,
    "tiny-video": _tiny_video,
}
_AUDIO_FIELDS = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "num_mel_bins",
    "max_source_positions",
    "pool_hidden",
    "classifier_hidden",
    "classifier_mid",
)


def model_config_from(name: str) -> ModelConfig:
    """A preset name (``published``, ``audio-only``, ``tiny``, ``tiny-video``) or a JSON file
    of ModelConfig fields (or a checkpoint's config.json, which holds them under
    ``model_config``)."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]()
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model must be a preset ({', '.join(sorted(MODEL_PRESETS))}) or a JSON file of "
            f"ModelConfig fields, got {name!r}"
        )
    data = json.loads(path.read_text())
    return ModelConfig.from_dict(data.get("model_config", data))


# --------------------------------------------------------------------------- configuration


def _opt(help: str, **more: Any) -> dict[str, Any]:
    return {"help": help, **more}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; saved as ``train_config.json`` and inside the final model."""

    # -- data
    data_dir: str | None = field(
        default=None, metadata=_opt("audiofolder dataset with video (metadata.jsonl, SPEC 5)")
    )
    audio_datasets: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "audio-only datasets: Hub ids (e.g. pipecat-ai/smart-turn-data-v3.2-train), "
            "save_to_disk directories or dataset folders"
        ),
    )
    audio_split: str = field(default="train", metadata=_opt("split of the audio-only datasets"))
    max_audio_samples: int | None = field(
        default=None, metadata=_opt("use at most this many rows of each audio-only dataset")
    )
    test_dir: str | None = field(
        default=None, metadata=_opt("a separate test dataset folder (evaluated after training)")
    )
    eval_fraction: float = field(
        default=0.1, metadata=_opt("share held out for validation, split by recording")
    )
    max_eval_samples: int | None = field(
        default=None, metadata=_opt("evaluate on at most this many held-out segments")
    )
    video_share: float = field(
        default=0.1,
        metadata=_opt("repeat the video set to this share of the audio-only set's size"),
    )
    balance_video: bool = field(
        default=True, metadata=_opt("up-sample the video set's minority class")
    )
    # -- model
    model: str = field(
        default="published",
        metadata=_opt("model preset (published, audio-only, tiny, tiny-video) or JSON file"),
    )
    init_from: str | None = field(
        default=None, metadata=_opt("start from this checkpoint (replaces --model and inits)")
    )
    audio_init: str = field(
        default="auto",
        metadata=_opt(
            "audio branch start: auto (Smart Turn v3.2 from pipecat-ai if installed, else "
            "openai/whisper-tiny; random for non-published sizes), smart-turn, a Smart Turn "
            ".onnx file, whisper, a Whisper model name/path, or random"
        ),
    )
    video_init: str = field(
        default="auto",
        metadata=_opt(
            "video branch start: auto (Kinetics-400 R3D-18 for published sizes, else random), "
            "kinetics, a weights file, or random"
        ),
    )
    # -- recipe
    batch_size: int = field(default=32, metadata=_opt("batch size per device"))
    stage1_epochs: float = field(default=1.0, metadata=_opt("stage 1 epochs (0 skips it)"))
    stage1_lr: float = field(default=5e-4, metadata=_opt("stage 1 learning rate"))
    stage1_max_steps: int | None = field(default=None, metadata=_opt("cap on stage 1 steps"))
    stage2_epochs: float = field(default=3.0, metadata=_opt("stage 2 epochs (0 skips it)"))
    stage2_lr: float = field(default=1e-5, metadata=_opt("stage 2 learning rate"))
    stage2_max_steps: int | None = field(default=None, metadata=_opt("cap on stage 2 steps"))
    weight_decay: float = field(default=0.01, metadata=_opt("AdamW weight decay"))
    warmup_ratio: float = field(default=0.05, metadata=_opt("share of each stage's warm-up"))
    max_grad_norm: float = field(default=1.0, metadata=_opt("gradient clipping (0: none)"))
    pos_weight_min: float = field(default=0.1, metadata=_opt("lower clamp of pos_weight"))
    pos_weight_max: float = field(default=10.0, metadata=_opt("upper clamp of pos_weight"))
    color_jitter: bool = field(default=False, metadata=_opt("colour-jitter video augmentation"))
    # -- run
    output_dir: str = field(default="runs/smart-turn-mm", metadata=_opt("run directory"))
    run_name: str | None = field(default=None, metadata=_opt("run name (W&B)"))
    seed: int = field(default=0, metadata=_opt("seed of the split, mix, order and init"))
    device: str = field(default="auto", metadata=_opt("auto, cpu, cuda or cuda:N"))
    precision: str = field(
        default="auto",
        metadata=_opt(
            "auto (bf16/fp16 on CUDA, fp32 on CPU)", choices=("auto", "fp32", "bf16", "fp16")
        ),
    )
    num_workers: int | None = field(
        default=None, metadata=_opt("data loader workers (default: CPUs - 1, at most 8)")
    )
    cache_decoded: bool = field(
        default=False,
        metadata=_opt(
            "keep decoded inputs in memory (small datasets; one cache per loader worker)"
        ),
    )
    cache_frozen_audio: bool = field(
        default=True, metadata=_opt("stage 1: compute each frozen audio embedding once")
    )
    eval_batch_size: int | None = field(default=None, metadata=_opt("default: batch size"))
    eval_every_steps: int | None = field(
        default=None, metadata=_opt("also evaluate every N steps (always: each epoch's end)")
    )
    save_every_steps: int = field(default=500, metadata=_opt("checkpoint every N steps"))
    keep_checkpoints: int = field(default=2, metadata=_opt("checkpoints kept"))
    log_every_steps: int = field(default=10, metadata=_opt("log every N steps"))
    bootstrap: int = field(default=1000, metadata=_opt("bootstrap resamples of the final eval"))
    report_to: str = field(
        default="none", metadata=_opt("also log to W&B", choices=("none", "wandb"))
    )
    wandb_project: str = field(default="smart-turn-mm", metadata=_opt("W&B project"))
    resume: bool = field(default=False, metadata=_opt("continue from output_dir's last checkpoint"))
    progress: bool = field(default=True, metadata=_opt("progress bars"))

    def __post_init__(self) -> None:
        if self.data_dir is None and not self.audio_datasets:
            raise ValueError("no training data: give data_dir and/or audio_datasets")
        if isinstance(self.audio_datasets, (str, list)):
            values = (
                [self.audio_datasets]
                if isinstance(self.audio_datasets, str)
                else self.audio_datasets
            )
            object.__setattr__(self, "audio_datasets", tuple(values))
        positive = ("batch_size", "save_every_steps", "log_every_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_epochs", "stage2_epochs", "stage1_lr", "stage2_lr", "video_share"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.report_to not in ("none", "wandb"):
            raise ValueError(f"report_to must be 'none' or 'wandb', got {self.report_to!r}")
        if not 0 < self.pos_weight_min <= self.pos_weight_max:
            raise ValueError("need 0 < pos_weight_min <= pos_weight_max")

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    output_dir: Path
    model_dir: Path
    metrics: dict[str, dict[str, Any]]  # held-out set -> EvaluationReport.to_dict()
    global_step: int
    samples_per_s: float  # training throughput (all ranks), data loading included
    elapsed_s: float


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainingData:
    """The training mix and the held-out sets (``val``: split from the training sources by
    recording before any oversampling; ``test``: a separate folder)."""

    train: list[Segment]
    held_out: dict[str, list[Segment]]
    summary: dict[str, Any]

    @property
    def monitored(self) -> dict[str, list[Segment]]:
        """The set evaluated DURING training: validation if there is one, else test (no
        decision depends on it: it is only logged)."""
        for name in ("val", "test"):
            if name in self.held_out:
                return {name: self.held_out[name]}
        return {}

    def fingerprint(self) -> str:
        """Identifies the training order's contents (checked when resuming)."""
        digest = hashlib.sha1()
        for s in self.train:
            digest.update(s.key.encode())
            digest.update(b"\0")
        return digest.hexdigest()


def _subsample(segments: list[Segment], limit: int | None, seed: int) -> list[Segment]:
    if limit is None or len(segments) <= limit:
        return segments
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(segments), size=limit, replace=False))
    return [segments[i] for i in keep]


def prepare_data(config: TrainConfig) -> TrainingData:
    """Load, drop unlabelled rows, split by recording, then mix the training side only."""
    video = drop_unlabelled(load_folder(config.data_dir)) if config.data_dir else []
    audio: list[Segment] = []
    for source in config.audio_datasets:
        audio += drop_unlabelled(
            load_audio_dataset(source, split=config.audio_split, max_rows=config.max_audio_samples)
        )
    train_v, val_v = split_by_group(video, config.eval_fraction, seed=config.seed)
    train_a, val_a = split_by_group(audio, config.eval_fraction, seed=config.seed)
    mix = mix_training_set(
        train_a,
        train_v,
        video_share=config.video_share,
        balance=config.balance_video,
        seed=config.seed,
    )
    if not mix.segments:
        raise ValueError("no labelled training segments left after the split")
    held_out: dict[str, list[Segment]] = {}
    if val_v or val_a:
        held_out["val"] = _subsample([*val_v, *val_a], config.max_eval_samples, config.seed)
    if config.test_dir:
        held_out["test"] = _subsample(
            drop_unlabelled(load_folder(config.test_dir)), config.max_eval_samples, config.seed
        )
    for name, segments in held_out.items():
        check_disjoint(mix.segments, segments, name)
    summary: dict[str, Any] = {
        **mix.summary(),
        "train_labels": label_counts(mix.segments),
        **{f"{name}_labels": label_counts(s) for name, s in held_out.items()},
    }
    return TrainingData(mix.segments, held_out, summary)


# --------------------------------------------------------------------------- model


def _init_audio(model: SmartTurnMultimodal, spec: str) -> str:
    from smart_turn_mm.locations import find_smart_turn_v3_onnx
    from smart_turn_mm.weights import init_audio_from_smart_turn_onnx, init_audio_from_whisper

    cfg = model.config
    published = all(getattr(cfg, f) == getattr(ModelConfig(), f) for f in _AUDIO_FIELDS)
    if spec == "auto":
        if not published:
            return "random"
        spec = "smart-turn" if find_smart_turn_v3_onnx() is not None else "whisper"
    if spec == "random":
        return "random"
    if spec == "smart-turn" or spec.endswith(".onnx"):
        path = init_audio_from_smart_turn_onnx(model, None if spec == "smart-turn" else spec)
        return f"smart-turn:{path}"
    name = "openai/whisper-tiny" if spec == "whisper" else spec
    try:
        init_audio_from_whisper(model, name)
    except OSError as e:
        raise ValueError(
            f"cannot load Whisper weights {name!r} ({e}); offline, use audio_init='smart-turn' "
            "(pip install pipecat-ai), a Smart Turn .onnx file, or 'random'"
        ) from e
    return f"whisper:{name}"


def _init_video(model: SmartTurnMultimodal, spec: str) -> str:
    from smart_turn_mm.weights import KINETICS_R3D18_URL, init_video_from_kinetics

    if not model.config.with_video:
        return "none"
    if spec == "auto":
        spec = "kinetics" if model.config.video_widths == ModelConfig().video_widths else "random"
    if spec == "random":
        return "random"
    source = KINETICS_R3D18_URL if spec == "kinetics" else spec
    try:
        init_video_from_kinetics(model, source)
    except OSError as e:
        raise ValueError(
            f"cannot load the Kinetics-400 R3D-18 weights from {source} ({e}); "
            "pass a local file or video_init='random'"
        ) from e
    return f"kinetics:{source}"


def build_model(config: TrainConfig) -> tuple[SmartTurnMultimodal, dict[str, str]]:
    """The model to train and how each part was initialised."""
    if config.init_from:
        from smart_turn_mm.weights import load_pretrained

        return load_pretrained(config.init_from).train(), {"checkpoint": config.init_from}
    torch.manual_seed(config.seed)
    model = SmartTurnMultimodal(model_config_from(config.model))
    info = {"audio": _init_audio(model, config.audio_init)}
    info["video"] = _init_video(model, config.video_init)
    return model.train(), info


def set_stage(model: SmartTurnMultimodal, stage: int) -> list[nn.Parameter]:
    """Freeze for ``stage`` (1: audio branch incl. pooling and classifier frozen; 2: nothing
    frozen) and return the trainable parameters."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    for p in model.parameters():
        p.requires_grad_(True)
    if stage == 1:
        for p in model.audio_parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


class _TrainForward(nn.Module):
    """Logits from features (or precomputed audio embeddings) and clips. The whole forward,
    cached-embedding path included, runs inside this module so DDP sees it."""

    def __init__(self, model: SmartTurnMultimodal) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_features: torch.Tensor,
        pixel_values: torch.Tensor | None,
        video_mask: torch.Tensor,
        audio_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model = self.model
        audio = model.encode_audio(input_features) if audio_embedding is None else audio_embedding
        video = None
        if model.config.with_video and pixel_values is not None and bool(video_mask.any()):
            video = audio.new_zeros(audio.shape[0], model.config.video_dim)
            video[video_mask] = model.encode_video(pixel_values[video_mask]).to(video.dtype)
        return model.head(audio, video)


def pos_weight(labels: torch.Tensor, low: float = 0.1, high: float = 10.0) -> torch.Tensor:
    """``#neg / #pos`` of the batch, clamped to [low, high] (no positives: ``high``)."""
    pos = float(labels.sum())
    neg = labels.numel() - pos
    value = high if pos == 0 else min(max(neg / pos, low), high)
    return torch.tensor([value], device=labels.device)


def _schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- evaluation


def _evaluate(
    model: SmartTurnMultimodal,
    held_out: dict[str, list[Segment]],
    runtime: Runtime,
    config: TrainConfig,
    audio_cache: dict[str, torch.Tensor] | None,
    *,
    bootstrap: int = 0,
) -> dict[str, tuple[EvaluationReport, Scores]]:
    """Score each held-out set, sharded over ranks (rank r scores segments[r::world])."""
    import numpy as np

    scorer = TorchScorer(model, device=str(runtime.device), precision=config.precision)
    results = {}
    for name, segments in held_out.items():
        local = score_segments(
            scorer,
            segments[runtime.rank :: runtime.world_size],
            batch_size=config.eval_batch_size or config.batch_size,
            audio_cache=audio_cache,
            progress=config.progress and runtime.main,
            desc=f"eval {name}",
        )
        parts = gather_objects(runtime, (local.audio_video, local.audio_only, local.has_video))
        av, ao, hv = np.zeros(len(segments)), np.zeros(len(segments)), np.zeros(len(segments), bool)
        for r, (a, b, c) in enumerate(parts):
            av[r :: runtime.world_size], ao[r :: runtime.world_size] = a, b
            hv[r :: runtime.world_size] = c
        labels = np.array([float(bool(s.label)) for s in segments])
        scores = Scores(list(segments), labels, av, ao, hv)
        report = summarize(scores, bootstrap=bootstrap if runtime.main else 0, seed=config.seed)
        results[name] = (report, scores)
    return results


def _eval_record(results: dict[str, tuple[EvaluationReport, Scores]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    keys = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "best_f1")
    for name, (report, _) in results.items():
        for mode in ("audio_video", "audio_only"):
            metrics = getattr(report, mode).to_dict()
            for key in (*keys, "best_f1_threshold"):
                record[f"eval/{name}/{mode}/{key}"] = metrics[key]
    return record


def _short(results: dict[str, tuple[EvaluationReport, Scores]]) -> str:
    parts = []
    for name, (report, _) in results.items():
        av, ao = report.audio_video, report.audio_only
        parts.append(
            f"{name}: acc {av.accuracy:.3f} f1 {av.f1:.3f} auc {av.roc_auc:.3f}"
            f" | audio-only acc {ao.accuracy:.3f} f1 {ao.f1:.3f} auc {ao.roc_auc:.3f}"
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------- training


@dataclass
class _Position:
    """Where the run is: what a checkpoint must restore."""

    stage: int = 1  # 3 = both stages done
    step_in_stage: int = 0
    epoch: int = 0  # within the stage
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0  # waiting for data + computing (no evaluation, no saving)

    def next_stage(self) -> _Position:
        return _Position(
            self.stage + 1, 0, 0, 0, self.global_step, self.samples_seen, self.train_seconds
        )


class _Window:
    """Running totals between two log lines."""

    def __init__(self) -> None:
        self.loss, self.steps, self.samples, self.seconds, self.wait = 0.0, 0, 0, 0.0, 0.0

    def add(self, loss: float, samples: int, seconds: float, wait: float) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.wait += wait

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss / max(self.steps, 1),
            "samples_per_s": self.samples / max(self.seconds, 1e-9),
            "data_wait": self.wait / max(self.seconds, 1e-9),  # share of time waiting for data
        }


def _num_workers(config: TrainConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    return min(8, max(0, (os.cpu_count() or 1) - 1))


class _Run:
    """One training run: the data, the model, the log and the checkpoints it shares between
    the two stages."""

    def __init__(
        self,
        config: TrainConfig,
        runtime: Runtime,
        on_step: Callable[[dict[str, Any]], None] | None,
        on_checkpoint: Callable[[Path], None] | None,
    ) -> None:
        from smart_turn_mm.checkpoints import latest_checkpoint, load_checkpoint
        from smart_turn_mm.loader import ColorJitter, EpochSampler, SegmentDataset

        self.config, self.runtime = config, runtime
        self.on_step, self.on_checkpoint = on_step, on_checkpoint
        self.out = Path(config.output_dir)
        if runtime.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.data = prepare_data(config)
        self.fingerprint = self.data.fingerprint()

        # A new run, or the last checkpoint.
        self.position = _Position()
        self.resumed: dict[str, Any] = {}
        checkpoint = latest_checkpoint(self.out) if config.resume else None
        if checkpoint is not None:
            self.model, self.resumed = load_checkpoint(checkpoint)
            self.init_info = self.resumed.get("init", {})
            self.position = _Position(**self.resumed["position"])
            if self.resumed.get("data_fingerprint") != self.fingerprint:
                raise ValueError(
                    f"cannot resume from {checkpoint}: the training data or its mix changed "
                    "since it was written (resume needs the same data, split and seed)"
                )
            runtime.print(
                f"resuming from {checkpoint}: stage {self.position.stage}, "
                f"step {self.position.global_step}"
            )
        else:
            if config.resume:
                runtime.print(f"resume: no checkpoint in {self.out}, starting a new run")
            self.model, self.init_info = build_model(config)
        self.model.to(runtime.device)
        if runtime.main:
            text = json.dumps(config.to_dict(), indent=2) + "\n"
            (self.out / "train_config.json").write_text(text)
        wandb = None
        if config.report_to == "wandb":
            wandb = {
                "project": config.wandb_project,
                "name": config.run_name,
                "config": config.to_dict(),
            }
        self.log = RunLog(
            self.out,
            enabled=runtime.main,
            resume_step=self.position.global_step if checkpoint else None,
            wandb=wandb,
        )
        runtime.print(f"data: {json.dumps(self.data.summary)}")
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        runtime.print(
            f"model: {n_params:.2f} M parameters, init {self.init_info}; "
            f"device {runtime.device} x {runtime.world_size}"
        )
        if checkpoint is None:
            self.log.log(
                {"step": 0, "event": "start", "data": self.data.summary, "init": self.init_info}
            )

        mcfg = self.model.config
        self.dataset = SegmentDataset(
            self.data.train,
            num_frames=mcfg.num_frames,
            frame_size=mcfg.frame_size,
            with_video=mcfg.with_video,
            jitter=ColorJitter() if config.color_jitter else None,
            seed=config.seed,
            cache=config.cache_decoded,
        )
        self.keys = [s.key for s in self.data.train]
        self.sampler = EpochSampler(
            len(self.dataset), seed=config.seed, rank=runtime.rank, world_size=runtime.world_size
        )
        self.batches_per_epoch = math.ceil(self.sampler.per_rank / config.batch_size)
        self.amp_dtype = autocast_dtype(config.precision, runtime.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.audio_cache: dict[str, torch.Tensor] = {}  # frozen audio embeddings (stage 1)

    # -- checkpoints and evaluation ---------------------------------------------------------

    def save(self, optimizer: Any = None, scheduler: Any = None) -> None:
        """Checkpoint the current position (with the optimizer when inside a stage)."""
        if not self.runtime.main:
            return
        from smart_turn_mm.checkpoints import save_checkpoint

        state = {
            "version": 1,
            "position": dataclasses.asdict(self.position),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": get_rng_state(self.runtime.device),
            "data_fingerprint": self.fingerprint,
            "init": self.init_info,
        }
        path = save_checkpoint(
            self.out,
            self.model,
            state,
            step=self.position.global_step,
            extra={"train_config": self.config.to_dict()},
            keep=self.config.keep_checkpoints,
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)

    def evaluate(self, stage: int, reason: str, cache: dict[str, torch.Tensor] | None) -> None:
        """Evaluate the monitored held-out set and log it (nothing depends on the result)."""
        if not self.data.monitored:
            return
        results = _evaluate(self.model, self.data.monitored, self.runtime, self.config, cache)
        step = self.position.global_step
        self.log.log(
            {"step": step, "stage": stage, "event": "eval", "reason": reason,
             **_eval_record(results)}
        )  # fmt: skip
        self.runtime.print(f"  eval at step {step} ({reason}): {_short(results)}")

    # -- a stage ----------------------------------------------------------------------------

    def run_stage(self, stage: int) -> None:
        """Train ``stage`` from the current position to its end (or skip it)."""
        from tqdm.auto import tqdm

        from smart_turn_mm.loader import make_loader

        config, runtime, pos = self.config, self.runtime, self.position
        params = set_stage(self.model, stage)
        epochs = config.stage1_epochs if stage == 1 else config.stage2_epochs
        cap = config.stage1_max_steps if stage == 1 else config.stage2_max_steps
        total = math.ceil(epochs * self.batches_per_epoch)
        total = min(total, cap) if cap is not None else total
        lr = config.stage1_lr if stage == 1 else config.stage2_lr
        if not params or total == 0:
            runtime.print(f"stage {stage}: skipped ({'0 steps' if params else 'nothing to train'})")
            self.position = pos.next_stage()
            return
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(total, config.warmup_ratio)
        )
        if self.resumed.get("optimizer") is not None and pos.stage == stage:
            optimizer.load_state_dict(self.resumed["optimizer"])
            scheduler.load_state_dict(self.resumed["scheduler"])
        if self.resumed.get("scaler"):
            self.scaler.load_state_dict(self.resumed["scaler"])
        if self.resumed.get("rng") is not None:
            set_rng_state(self.resumed["rng"], runtime.device)
        self.resumed = {}
        forward: nn.Module = _TrainForward(self.model)
        if runtime.distributed:
            forward = nn.parallel.DistributedDataParallel(
                forward,
                device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                find_unused_parameters=True,  # batches without video skip the backbone
            )
        cache = self.audio_cache if stage == 1 and config.cache_frozen_audio else None
        what = "audio branch frozen" if stage == 1 else "all trainable"
        runtime.print(
            f"stage {stage}: {total} steps x {config.batch_size * runtime.world_size} samples "
            f"({what}), lr {lr:g}"
        )
        # One loader per stage: its workers (and their decoded-input caches) persist across
        # epochs; each epoch's order comes from the sampler, set before iterating.
        loader = make_loader(
            self.dataset,
            self.sampler,
            batch_size=config.batch_size,
            num_workers=_num_workers(config),
            pin_memory=runtime.device.type == "cuda",
            seed=config.seed,
        )
        bar = tqdm(
            total=total,
            initial=pos.step_in_stage,
            desc=f"stage {stage}",
            disable=not (config.progress and runtime.main),
            dynamic_ncols=True,
        )
        window = _Window()
        self.model.train()
        while pos.step_in_stage < total:
            start = pos.step_in_epoch * config.batch_size
            self.sampler.set_epoch(stage * 100_000 + pos.epoch, start=start)
            t0 = time.perf_counter()
            for batch in loader:
                t_data = time.perf_counter()
                keys = [self.keys[i] for i in batch["indices"].tolist()]
                loss = self._step(forward, batch, keys, cache, optimizer, params)
                scheduler.step()
                n = len(batch["labels"]) * runtime.world_size
                seconds = time.perf_counter() - t0
                window.add(loss, n, seconds, t_data - t0)
                pos.step_in_stage += 1
                pos.step_in_epoch += 1
                pos.global_step += 1
                pos.samples_seen += n
                pos.train_seconds += seconds
                bar.update(1)
                stage_done = pos.step_in_stage >= total
                epoch_done = pos.step_in_epoch >= self.batches_per_epoch
                record = {"step": pos.global_step, "stage": stage, "loss": loss,
                          "lr": scheduler.get_last_lr()[0], "epoch": pos.epoch}  # fmt: skip
                if pos.global_step % config.log_every_steps == 0 or stage_done:
                    record.update(window.summary())
                    self.log.log({"event": "train", **record})
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}"
                    )
                    window = _Window()
                if epoch_done:
                    pos.epoch += 1
                    pos.step_in_epoch = 0
                every = config.eval_every_steps
                if not stage_done and every and pos.global_step % every == 0:
                    self.evaluate(stage, f"every {every} steps", cache)
                elif not stage_done and epoch_done:
                    self.evaluate(stage, f"end of epoch {pos.epoch}", cache)
                if not stage_done and pos.global_step % config.save_every_steps == 0:
                    self.save(optimizer, scheduler)
                if self.on_step is not None:
                    self.on_step(record)
                if stage_done or epoch_done:
                    break
                t0 = time.perf_counter()
        bar.close()
        if stage == 1:  # after stage 2 comes the final evaluation
            self.evaluate(stage, "end of stage 1", cache)
        self.position = pos.next_stage()
        self.save()  # the next stage starts with a fresh optimizer

    def _step(
        self,
        forward: nn.Module,
        batch: dict[str, Any],
        keys: list[str],
        cache: dict[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer,
        params: Sequence[nn.Parameter],
    ) -> float:
        """One optimizer step; returns the batch loss."""
        config, device = self.config, self.runtime.device
        labels = batch["labels"].to(device, non_blocking=True)
        features = batch["input_features"]
        pixels = batch["pixel_values"]
        if pixels is not None:
            pixels = pixels.to(device, non_blocking=True)
        mask = batch["video_mask"].to(device, non_blocking=True)
        with autocast(device, self.amp_dtype):
            audio = None
            if cache is not None:  # frozen audio branch: embeddings computed once per segment
                audio = cached_audio_embeddings(self.model, features, keys, cache, device)
            else:
                features = features.to(device, non_blocking=True)
            logits = forward(features, pixels, mask, audio).float().reshape(-1)
        weight = pos_weight(labels, config.pos_weight_min, config.pos_weight_max)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.max_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return float(loss.detach())

    # -- the end ----------------------------------------------------------------------------

    def finish(self, started: float) -> TrainResult:
        """Final evaluation with the full report, the final model, the result."""
        from smart_turn_mm.weights import save_pretrained

        config, runtime, out = self.config, self.runtime, self.out
        results = _evaluate(
            self.model, self.data.held_out, runtime, config, None, bootstrap=config.bootstrap
        )
        metrics: dict[str, dict[str, Any]] = {}
        for name, (report, scores) in results.items():
            if runtime.main:
                report = write_report(report, scores, out / "eval" / name)
            metrics[name] = report.to_dict()
        pos = self.position
        sps = pos.samples_seen / max(pos.train_seconds, 1e-9)
        model_dir = out / "model"
        if runtime.main:
            extra = {
                "train_config": config.to_dict(),
                "init": self.init_info,
                "metrics": metrics,
                "global_step": pos.global_step,
            }
            save_pretrained(self.model, model_dir, extra=extra)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            self.log.log(
                {"step": pos.global_step, "event": "final", "samples_per_s": sps,
                 **_eval_record(results)}
            )  # fmt: skip
            for name, (report, _) in results.items():
                runtime.print(f"held-out set '{name}':\n{report.format_table()}")
        self.log.close()
        return TrainResult(
            output_dir=out,
            model_dir=model_dir,
            metrics=metrics,
            global_step=pos.global_step,
            samples_per_s=sps,
            elapsed_s=time.perf_counter() - started,
        )


def train(
    config: TrainConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Run the two-stage recipe described in the module docstring.

    Args:
        config: the run's settings.
        on_step: called after every optimizer step (after that step's evaluation and
            checkpoint, if any) with the step's log record; an exception raised there stops the
            run as a kill would (the resume tests use it).
        on_checkpoint: called with each checkpoint directory once it is complete (e.g. to
            commit a Modal volume).
    """
    started = time.perf_counter()
    runtime = setup_runtime(config.device)
    try:
        run = _Run(config, runtime, on_step, on_checkpoint)
        for stage in (1, 2):
            if run.position.stage <= stage:
                run.run_stage(stage)
        result = run.finish(started)
        if runtime.distributed:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has written everything
        return result
    finally:
        if runtime.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------- command line


def _field_type(hint: Any) -> Any:
    """The argparse type of a TrainConfig field: int, float, str, bool or tuple (of str)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm train`` and ``train_multimodal.py``: ``--config FILE``
    (a JSON TrainConfig, e.g. a run's train_config.json) and one flag per TrainConfig field
    (``--stage1-lr``, ``--data-dir``...); flags override the file."""
    parser.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is tuple:
            parser.add_argument(flag, nargs="*", metavar="SOURCE", **kwargs)
        else:
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, type=kind, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from ``--config`` (if given) and the flags that were set."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = json.loads(Path(args.config).read_text())
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return TrainConfig.from_dict(values)


def run_train_from_args(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = train(config)
    print(f"model: {result.model_dir}")
    print(
        f"steps: {result.global_step}, {result.samples_per_s:.1f} samples/s, "
        f"{result.elapsed_s:.0f} s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train Smart Turn Multimodal (two stages).")
    add_train_arguments(parser)
    return run_train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
