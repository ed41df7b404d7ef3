"""The run's log: ``log.jsonl`` always (one JSON object per line), Weights & Biases when
asked for (imported only then; ``WANDB_MODE=offline`` is honoured by wandb itself)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LOG_NAME", "RunLog"]

LOG_NAME = "log.jsonl"


class RunLog:
    """Appends records to ``<run>/log.jsonl`` (and W&B). Disabled on non-main ranks.

    Args:
        out: the run directory.
        enabled: False on DDP ranks other than 0.
        resume_step: when resuming, records after this step are dropped (the resumed run
            redoes them); None starts an empty log.
        wandb: ``{"project", "name", "config"}`` to also log to W&B, or None.
    """

    def __init__(
        self,
        out: Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        wandb: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(out) / LOG_NAME
        self.enabled = enabled
        self.wandb: Any = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        if wandb is not None:
            import wandb as wandb_lib  # lazy: only when asked for

            id_file = Path(out) / "wandb_run_id"  # the same W&B run across resumes
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb_lib.init(
                project=wandb["project"],
                name=wandb.get("name"),
                config=dict(wandb.get("config") or {}),
                id=run_id,
                resume="allow",
                dir=str(out),
            )

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in line.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb.log(numbers, step=line.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
