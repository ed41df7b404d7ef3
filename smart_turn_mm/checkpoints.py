"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory ``<run>/checkpoints/step-XXXXXXXX/`` holding the model
(:func:`~smart_turn_mm.weights.save_pretrained`: ``config.json`` + ``model.safetensors``) and
``trainer_state.pt`` (optimizer, scheduler, grad scaler, stage, step, epoch, position in the
epoch, RNG states). It is written in a hidden staging directory that is renamed into place when
complete, and becomes THE checkpoint only when ``checkpoints/latest`` (a one-line text file
naming it) is atomically replaced; a run killed while writing leaves the previous checkpoint in
charge. Older checkpoints are then pruned.

``trainer_state.pt`` holds tensors and plain Python values only, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from smart_turn_mm.locations import atomic_path
from smart_turn_mm.model import SmartTurnMultimodal
from smart_turn_mm.weights import load_pretrained, save_pretrained

__all__ = [
    "LATEST_NAME",
    "STATE_NAME",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "trainer_state.pt"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: SmartTurnMultimodal,
    state: Mapping[str, Any],
    *,
    step: int,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for global step ``step`` and make it the latest; keep the newest
    ``keep`` checkpoints. Returns the checkpoint directory."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    if (root / name).exists():  # the same step saved twice: never touch the old one
        name = f"{name}-{len(list(root.glob(name + '*')))}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_pretrained(model, staging, extra=extra)
        _atomic_torch_save(dict(state), staging / STATE_NAME)
        os.replace(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    target = root / name
    _atomic_write_text(root / LATEST_NAME, name + "\n")
    if keep > 0:
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        for old in done[: max(0, len(done) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that ``checkpoints/latest`` names, or None when there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / STATE_NAME).is_file():
        raise ValueError(f"{pointer} names {target}, which has no {STATE_NAME}")
    return target


def load_checkpoint(path: str | os.PathLike) -> tuple[SmartTurnMultimodal, dict[str, Any]]:
    """(model in train mode, trainer state) of a checkpoint directory."""
    path = Path(path)
    model = load_pretrained(path).train()
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    return model, state
