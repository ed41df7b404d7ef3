"""The Modal app (``train_modal.py``), exercised locally: its definition, the function body on
a temporary directory standing in for the volume, and the upload helper. No cloud access."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from smart_turn_mm.synthetic import generate_dataset
from smart_turn_mm.volume_training import find_dataset, train_on_volume

pytest.importorskip("modal")
ROOT = Path(__file__).resolve().parents[1]


def _load_app(name: str = "train_modal_under_test"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train_modal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_module():
    return _load_app()


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volume")
    generate_dataset(
        root / "datasets" / "syn",
        recordings=5,
        segments_per_recording=3,
        video_seconds=0.4,
        frame_size=48,
        workers=1,
    )
    return root


OPTIONS = {
    "model": "tiny",
    "audio_datasets": [],
    "batch_size": 4,
    "eval_fraction": 0.2,
    "stage1_max_steps": 2,
    "stage2_max_steps": 1,
    "num_workers": 0,
    "bootstrap": 0,
    "progress": False,
}


def test_app_definition(app_module) -> None:
    import modal

    assert isinstance(app_module.app, modal.App) and app_module.app.name == "smart-turn-mm-train"
    assert app_module.VOLUME_NAME == "endpointing" and app_module.VOLUME_PATH == "/data"
    assert app_module.GPU == "A10G"
    assert isinstance(app_module.train_remote, modal.Function)
    assert isinstance(app_module.image, modal.Image)
    spec = getattr(app_module.train_remote, "_spec_", None)  # private: checked when present
    if spec is not None:
        assert spec.gpus == "A10G"
        assert set(spec.volumes) == {"/data"}
        assert spec.secrets == []  # W&B secret only when asked for


def test_gpu_and_wandb_secret_are_configurable(monkeypatch) -> None:
    monkeypatch.setenv("SMART_TURN_MM_GPU", "H100")
    monkeypatch.setenv("SMART_TURN_MM_WANDB_SECRET", "wandb")
    module = _load_app("train_modal_h100")
    assert module.GPU == "H100"
    spec = getattr(module.train_remote, "_spec_", None)
    if spec is not None:
        assert spec.gpus == "H100" and len(spec.secrets) == 1


def test_entrypoint_options(app_module) -> None:
    options = app_module.job_options("a,b", "wandb", json.dumps({"stage1_epochs": 2}))
    assert options == {"stage1_epochs": 2, "audio_datasets": ["a", "b"], "report_to": "wandb"}
    assert app_module.job_options("", "none", "")["audio_datasets"] == []


@pytest.mark.filterwarnings("ignore:The train_remote function is executing locally")
def test_function_body_runs_locally_on_a_volume_directory(app_module, volume, monkeypatch):
    monkeypatch.setattr(app_module, "VOLUME_PATH", str(volume))
    summary = app_module.train_remote.local("syn", dict(OPTIONS), "", False)
    run = volume / "runs" / "syn"
    assert summary["run_dir"] == str(run) and summary["global_step"] == 3
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    assert "val" in summary["metrics"]
    # A restarted container resumes: the finished run is not trained again.
    again = app_module.train_remote.local("syn", dict(OPTIONS), "", False)
    assert again["global_step"] == 3


def test_volume_job_commits_and_checks_its_inputs(volume, tmp_path) -> None:
    commits: list[int] = []
    summary = train_on_volume(
        volume,
        "syn",
        options=OPTIONS,
        run_name="committed",
        export=False,
        commit=lambda: commits.append(1),
    )
    assert summary["global_step"] == 3
    assert len(commits) >= 3  # each checkpoint (two stage ends) and the end
    with pytest.raises(FileNotFoundError, match="upload"):
        find_dataset(volume, "missing")
    with pytest.raises(ValueError, match="output_dir"):
        train_on_volume(volume, "syn", options={**OPTIONS, "output_dir": "x"})


def test_upload_helper_checks_then_copies(app_module, volume, monkeypatch) -> None:
    calls: list[tuple[str, str]] = []

    class FakeVolume:
        @contextlib.contextmanager
        def batch_upload(self, force: bool = False):
            class Batch:
                def put_directory(self, local: str, remote: str) -> None:
                    calls.append((local, remote))

            yield Batch()

    monkeypatch.setattr(app_module.modal.Volume, "from_name", lambda *a, **k: FakeVolume())
    remote = app_module.upload(str(volume / "datasets" / "syn"), "cc_v3")
    assert remote == "/datasets/cc_v3" and calls == [(str(volume / "datasets" / "syn"), remote)]
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        app_module.upload(str(volume))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The train_remote function is executing locally")
def test_function_body_exports_after_training(app_module, volume, monkeypatch) -> None:
    monkeypatch.setattr(app_module, "VOLUME_PATH", str(volume))
    summary = app_module.train_remote.local("syn", dict(OPTIONS), "with-export", True)
    assert summary["export"]["status"] == "PASSED", summary["export"]
    assert (volume / "runs" / "with-export" / "export" / "export-report.json").is_file()
