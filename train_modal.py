"""Train Smart Turn Multimodal on a Modal GPU: the same ``smart_turn_mm.train.train``.

    python train_modal.py upload data/casual_conversations_v3        # dataset -> volume
    modal run --detach train_modal.py --multimodal casual_conversations_v3

The dataset folder (metadata.jsonl + audio/ + video/) lives on the volume ``endpointing``
under ``datasets/<name>``; the run (checkpoints, logs, model, eval, ONNX export) goes to
``runs/<run name>``; Hugging Face and torch caches live on the volume too. A restarted
container resumes from the last checkpoint.

Options: ``--audio-datasets`` (comma-separated; default: the published audio-only set, "" for
none), ``--run-name``, ``--report-to wandb``, ``--no-export``, ``--options '{"stage1_epochs": 2}'``
(any TrainConfig field). GPU: A10G, or ``SMART_TURN_MM_GPU=H100 modal run ...``. W&B:
``SMART_TURN_MM_WANDB_SECRET=<Modal secret with WANDB_API_KEY>`` and ``--report-to wandb``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import modal

APP_NAME = "smart-turn-mm-train"
VOLUME_NAME = "endpointing"
VOLUME_PATH = "/data"  # where the volume is mounted inside the container
GPU = os.environ.get("SMART_TURN_MM_GPU", "A10G")
WANDB_SECRET = os.environ.get("SMART_TURN_MM_WANDB_SECRET")  # optional
TIMEOUT_S = 24 * 3600
ROOT = Path(__file__).resolve().parent

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install_from_pyproject(
        str(ROOT / "pyproject.toml"), optional_dependencies=["train", "pipecat"]
    )
    .env(
        {
            "HF_HOME": f"{VOLUME_PATH}/cache/huggingface",
            "TORCH_HOME": f"{VOLUME_PATH}/cache/torch",
            "XDG_CACHE_HOME": f"{VOLUME_PATH}/cache",
        }
    )
    # The package with its assets (the face detector), not only its .py files.
    .add_local_python_source(
        "smart_turn_mm", ignore=lambda p: "__pycache__" in p.parts or p.suffix == ".pyc"
    )
)
app = modal.App(APP_NAME, image=image)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)


@app.function(
    gpu=GPU,
    volumes={VOLUME_PATH: volume},
    timeout=TIMEOUT_S,
    secrets=[modal.Secret.from_name(WANDB_SECRET)] if WANDB_SECRET else [],
    retries=modal.Retries(max_retries=2, initial_delay=10.0),
)
def train_remote(dataset: str, options: dict, run_name: str = "", export: bool = True) -> dict:
    """Train (resuming if a checkpoint exists) and export, on the mounted volume."""
    from smart_turn_mm.volume_training import train_on_volume

    return train_on_volume(
        VOLUME_PATH,
        dataset,
        options=options,
        run_name=run_name or None,
        export=export,
        commit=None if modal.is_local() else volume.commit,
    )


def job_options(audio_datasets: str, report_to: str, options: str) -> dict:
    """TrainConfig fields from the entrypoint's flags."""
    values = json.loads(options) if options else {}
    values["audio_datasets"] = [s for s in audio_datasets.split(",") if s.strip()]
    values["report_to"] = report_to
    return values


@app.local_entrypoint()
def main(
    multimodal: str = "casual_conversations_v3",
    audio_datasets: str = "pipecat-ai/smart-turn-data-v3.2-train",
    run_name: str = "",
    report_to: str = "none",
    options: str = "",
    export: bool = True,
) -> None:
    summary = train_remote.remote(
        multimodal, job_options(audio_datasets, report_to, options), run_name, export
    )
    print(json.dumps(summary, indent=2))


def upload(local_dir: str, name: str | None = None) -> str:
    """Check a local dataset folder and copy it to ``datasets/<name>`` on the volume."""
    from smart_turn_mm.dataset import load_folder

    folder = Path(local_dir)
    rows = load_folder(folder)  # fails early, naming the bad row or file
    name = name or folder.resolve().name
    remote = f"/datasets/{name}"
    vol = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    with vol.batch_upload(force=True) as batch:
        batch.put_directory(str(folder), remote)
    print(f"uploaded {len(rows)} segments from {folder} to volume {VOLUME_NAME}:{remote}")
    return remote


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Helpers for the Modal training app.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload a dataset folder to the volume")
    up.add_argument("local_dir", help="dataset folder (metadata.jsonl + audio/ + video/)")
    up.add_argument("--name", help="name on the volume (default: the folder's name)")
    args = parser.parse_args()
    upload(args.local_dir, args.name)
