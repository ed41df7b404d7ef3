"""Training on a mounted volume (the body of the Modal function in ``train_modal.py``).

Layout of the volume (a directory here; ``/data`` in the Modal container)::

    datasets/<name>/     a dataset folder (metadata.jsonl + audio/ + video/), uploaded with
                         ``python train_modal.py upload``; <name>/ at the top level also works
    runs/<run name>/     the run: checkpoints, logs, final model, eval/, export/
    cache/               Hugging Face and torch caches (set by the Modal image)

The run always resumes: a container restarted by Modal continues from the run's last
checkpoint. ``commit`` (the volume's commit) is called after every checkpoint and at the end,
so a checkpoint survives the container.

Plain Python (no Modal import), so the tests run it on a temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_AUDIO_DATASET", "find_dataset", "train_on_volume"]

# The published audio-only training set, mixed with the video set (SPEC 5, 6).
DEFAULT_AUDIO_DATASET = "pipecat-ai/smart-turn-data-v3.2-train"
DATASETS_DIR = "datasets"
RUNS_DIR = "runs"


def find_dataset(volume_dir: str | os.PathLike, name: str) -> Path:
    """``<volume>/datasets/<name>`` or ``<volume>/<name>``, whichever holds metadata.jsonl."""
    root = Path(volume_dir)
    candidates = [root / DATASETS_DIR / name, root / name]
    for path in candidates:
        if (path / "metadata.jsonl").is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"dataset {name!r} not found on the volume (tried {tried}); upload it with "
        f"`python train_modal.py upload <folder> --name {name}`"
    )


def train_on_volume(
    volume_dir: str | os.PathLike,
    dataset: str,
    *,
    options: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    export: bool = True,
    commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train on ``<volume>/datasets/<dataset>`` into ``<volume>/runs/<run_name>``, then export.

    Args:
        volume_dir: where the volume is mounted.
        dataset: the dataset folder's name on the volume.
        options: any other :class:`~smart_turn_mm.train.TrainConfig` fields (e.g.
            ``audio_datasets``, ``stage1_epochs``, ``report_to``).
        run_name: default: the dataset's name.
        export: export fp32 + int8 ONNX (calibrated on the dataset) into ``<run>/export``.
        commit: persists the volume (called after each checkpoint and at the end).

    Returns:
        a JSON-ready summary: paths, steps, samples/s, held-out metrics, export status.
    """
    from smart_turn_mm.train import TrainConfig, train

    commit = commit or (lambda: None)
    data_dir = find_dataset(volume_dir, dataset)
    run_name = run_name or dataset
    out = Path(volume_dir) / RUNS_DIR / run_name
    values = dict(options or {})
    for reserved in ("data_dir", "output_dir"):
        if reserved in values:
            raise ValueError(f"{reserved} is set by the volume layout; do not pass it")
    config = TrainConfig.from_dict(
        {
            "run_name": run_name,
            **values,
            "data_dir": str(data_dir),
            "output_dir": str(out),
            "resume": True,
        }
    )
    result = train(config, on_checkpoint=lambda _path: commit())
    commit()
    summary: dict[str, Any] = {
        "run_dir": str(result.output_dir),
        "model_dir": str(result.model_dir),
        "global_step": result.global_step,
        "samples_per_s": result.samples_per_s,
        "elapsed_s": result.elapsed_s,
        "metrics": result.metrics,
    }
    if export and int(os.environ.get("RANK", "0")) == 0:
        from smart_turn_mm.export import CalibrationData, ExportValidationError, export_onnx

        try:
            report = export_onnx(
                result.model_dir,
                out / "export",
                calibration=CalibrationData.from_dataset(data_dir),
            )
            summary["export"] = {"status": report.status, "dir": str(out / "export")}
        except ExportValidationError as e:
            summary["export"] = {"status": "FAILED", "error": str(e), "dir": str(out / "export")}
        commit()
    return summary
