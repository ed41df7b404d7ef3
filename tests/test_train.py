"""Training: both stages' freezing, the loss weight, resume after a kill, DDP, the command
line, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smart_turn_mm.train import (
    TrainConfig,
    add_train_arguments,
    build_model,
    config_from_args,
    model_config_from,
    pos_weight,
    set_stage,
    train,
)
from smart_turn_mm.weights import load_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(small_dataset: Path) -> Path:
    return small_dataset


def _config(folder: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "data_dir": str(folder),
        "model": "tiny",
        "output_dir": str(out),
        "eval_fraction": 0.2,
        "batch_size": 4,
        "stage1_epochs": 1.0,
        "stage2_epochs": 1.0,
        "stage2_max_steps": 3,
        "stage2_lr": 1e-3,
        "save_every_steps": 2,
        "num_workers": 0,
        "bootstrap": 0,
        "progress": False,
        "log_every_steps": 1,
    }
    return TrainConfig(**{**values, **overrides})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict, prefixes: tuple[str, ...]) -> set[bool]:
    return {
        not torch.equal(before[k], after[k])
        for k in before
        if k.startswith(prefixes) and before[k].is_floating_point() and "running" not in k
    }


AUDIO = ("encoder.", "pool_attention.", "classifier.")
VIDEO = ("video_backbone.", "fusion_layer.")


# --------------------------------------------------------------------------- the recipe


def test_set_stage_freezes_the_whole_audio_branch() -> None:
    model, _ = build_model(TrainConfig(data_dir=".", model="tiny"))
    trainable = set_stage(model, 1)
    audio = {id(p) for p in model.audio_parameters()}
    assert audio and not any(p.requires_grad for p in model.audio_parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.video_parameters()}
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("classifier.") for n in names)  # the head too, not only the encoder
    assert any(n.startswith("pool_attention.") for n in names)
    assert len(set_stage(model, 2)) == len(list(model.parameters()))
    with pytest.raises(ValueError):
        set_stage(model, 3)


def test_stage1_trains_only_video_and_fusion(folder: Path, tmp_path: Path) -> None:
    config = _config(folder, tmp_path / "s1", stage1_max_steps=2, stage2_epochs=0.0)
    initial = _state(build_model(config)[0])
    result = train(config)
    final = _state(load_pretrained(result.model_dir))
    assert result.global_step == 2
    assert _changed(initial, final, AUDIO) == {False}
    assert _changed(initial, final, VIDEO) == {True}


def test_stage2_trains_everything_with_a_fresh_optimizer(folder: Path, tmp_path: Path) -> None:
    config = _config(folder, tmp_path / "s2", stage1_epochs=0.0, stage2_max_steps=2)
    initial = _state(build_model(config)[0])
    result = train(config)
    final = _state(load_pretrained(result.model_dir))
    assert result.global_step == 2
    assert True in _changed(initial, final, ("encoder.",))
    assert True in _changed(initial, final, ("classifier.",))
    assert True in _changed(initial, final, ("video_backbone.",))


def test_frozen_audio_cache_changes_nothing(folder: Path, tmp_path: Path) -> None:
    runs = []
    for cached in (True, False):
        config = _config(
            folder,
            tmp_path / f"c{cached}",
            stage1_max_steps=3,
            stage2_epochs=0.0,
            cache_frozen_audio=cached,
        )
        runs.append(_state(load_pretrained(train(config).model_dir)))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], atol=1e-5, rtol=1e-4)


def test_pos_weight_is_neg_over_pos_clamped() -> None:
    assert pos_weight(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(3.0)
    assert pos_weight(torch.tensor([1.0, 1, 1, 0])).item() == pytest.approx(1 / 3)
    assert pos_weight(torch.tensor([1.0] * 20 + [0.0])).item() == pytest.approx(0.1)
    assert pos_weight(torch.tensor([1.0] + [0.0] * 30)).item() == pytest.approx(10.0)
    assert pos_weight(torch.tensor([0.0, 0.0])).item() == pytest.approx(10.0)


def test_model_presets_and_files(tmp_path: Path) -> None:
    from smart_turn_mm.model import ModelConfig

    assert model_config_from("tiny") == ModelConfig.tiny()
    tv = model_config_from("tiny-video")
    assert tv.d_model == 384 and tv.video_widths == ModelConfig.tiny().video_widths
    (tmp_path / "m.json").write_text(json.dumps(ModelConfig.tiny(with_video=False).to_dict()))
    assert not model_config_from(str(tmp_path / "m.json")).with_video
    with pytest.raises(ValueError, match="preset"):
        model_config_from("huge")


def test_initialisation_choices(v32_onnx, tmp_path) -> None:
    from smart_turn_mm.weights import smart_turn_onnx_state_dict

    _, info = build_model(TrainConfig(data_dir=".", model="tiny"))
    assert info == {"audio": "random", "video": "random"}  # auto: no weights fit tiny sizes
    model, info = build_model(TrainConfig(data_dir=".", model="tiny-video", audio_init="auto"))
    assert info["audio"] == f"smart-turn:{v32_onnx}"
    reference = smart_turn_onnx_state_dict(v32_onnx)
    state = model.state_dict()
    for key in ("classifier.6.weight", "pool_attention.0.weight", "encoder.conv1.weight"):
        torch.testing.assert_close(state[key], reference[key])  # the head too, not only encoder
    empty = tmp_path / "not-whisper"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot load Whisper weights"):
        build_model(
            TrainConfig(
                data_dir=".", model="tiny-video", audio_init=str(empty), video_init="random"
            )
        )
    with pytest.raises(ValueError, match="video_init='random'"):
        build_model(TrainConfig(data_dir=".", model="tiny", video_init="/no/such/r3d.pth"))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="no training data"):
        TrainConfig()
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainConfig(data_dir=".", eval_fraction=1.0)
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(data_dir=".", report_to="tensorboard")
    config = TrainConfig(data_dir=".", audio_datasets=["a", "b"])
    assert config.audio_datasets == ("a", "b")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"data_dir": ".", "lr": 1})


# --------------------------------------------------------------------------- end to end


def test_tiny_end_to_end_run(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(_config(folder, out, bootstrap=50))
    assert result.global_step == 4 + 3  # stage 1: ceil(15 / 4) steps, stage 2: 3 (capped)
    assert result.samples_per_s > 0
    for name in ("train_config.json", "log.jsonl", "metrics.json", "model/config.json"):
        assert (out / name).is_file(), name
    for name in ("metrics.json", "predictions.csv", "roc.png", "pr.png", "confusion.png"):
        assert (out / "eval" / "val" / name).is_file(), name
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["train_config"]["model"] == "tiny" and "val" in meta["metrics"]
    assert (
        TrainConfig.from_dict(json.loads((out / "train_config.json").read_text())).model == "tiny"
    )
    val = result.metrics["val"]
    for mode in ("audio_video", "audio_only"):
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
            assert key in val[mode]
        assert "best_f1_threshold" in val[mode]
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "final"
    assert any(e["event"] == "eval" for e in events)
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == list(range(1, 8))
    assert all("samples_per_s" in e and "data_wait" in e for e in events if e["event"] == "train")
    model = load_pretrained(out / "model")
    assert model.config.num_frames == 8


def test_resume_after_a_kill_matches_an_uninterrupted_run(folder: Path, tmp_path: Path) -> None:
    """Kill inside stage 1 (after step 3; last checkpoint at 2) and inside stage 2 (after step
    5; last checkpoint at the stage boundary, 4), resume each time: the final weights are those
    of a run that was never interrupted."""
    common = {"color_jitter": True, "eval_every_steps": 3}
    reference = train(_config(folder, tmp_path / "ref", **common))
    expected = _state(load_pretrained(reference.model_dir))

    class Killed(RuntimeError):
        pass

    def kill_at(step: int):
        def on_step(record: dict) -> None:
            if record["step"] == step:
                raise Killed(f"killed after step {step}")

        return on_step

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(_config(folder, out, **common), on_step=kill_at(3))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    with pytest.raises(Killed):
        train(_config(folder, out, resume=True, **common), on_step=kill_at(5))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    saved = []
    result = train(_config(folder, out, resume=True, **common), on_checkpoint=saved.append)
    assert result.global_step == reference.global_step
    assert saved and saved[-1].name.startswith("step-00000007")
    final = _state(load_pretrained(result.model_dir))
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], atol=1e-6, rtol=1e-5)
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == list(range(1, 8))  # redone steps replace the lost ones, no duplicates
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2  # older ones pruned


def test_resume_refuses_changed_data(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(folder, out, stage2_epochs=0.0))
    with pytest.raises(ValueError, match="changed"):
        train(_config(folder, out, stage2_epochs=0.0, seed=1, resume=True))


def test_bf16_autocast_step(folder: Path, tmp_path: Path) -> None:
    result = train(
        _config(folder, tmp_path / "bf16", precision="bf16", stage1_max_steps=1, stage2_max_steps=1)
    )
    assert result.global_step == 2


def test_wandb_offline(folder: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    train(_config(folder, out, report_to="wandb", stage1_max_steps=1, stage2_max_steps=1))
    assert (out / "wandb_run_id").is_file()
    assert list((out / "wandb").glob("offline-run-*"))


# --------------------------------------------------------------------------- command line


def test_command_line_builds_the_config(folder: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--data-dir",
            str(folder),
            "--audio-datasets",
            "a",
            "b",
            "--stage1-lr",
            "1e-3",
            "--no-balance-video",
            "--report-to",
            "none",
        ]
    )
    config = config_from_args(args)
    assert config.audio_datasets == ("a", "b") and config.stage1_lr == 1e-3
    assert config.balance_video is False and config.batch_size == 32
    saved = tmp_path / "c.json"
    saved.write_text(json.dumps(dataclasses.replace(config, batch_size=8).to_dict()))
    args = parser.parse_args(["--config", str(saved), "--resume"])
    again = config_from_args(args)
    assert again.batch_size == 8 and again.resume and again.audio_datasets == ("a", "b")
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])


def test_train_script_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train_multimodal.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--stage1-lr" in out and "--resume" in out and "--report-to" in out


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(folder: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo): one run, rank 0 alone writes, then resume under DDP."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "train_multimodal.py"),
        "--data-dir", str(folder), "--model", "tiny", "--output-dir", str(out),
        "--batch-size", "4", "--stage2-max-steps", "2", "--save-every-steps", "1",
        "--num-workers", "0", "--no-progress", "--bootstrap", "0", "--log-every-steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == sorted(set(steps))  # one writer
    # Each rank gets ceil(n / 2) segments: ceil(that / 4) steps in stage 1, then 2 in stage 2.
    n = events[0]["data"]["train_total"]
    assert steps[-1] == math.ceil(math.ceil(n / 2) / 4) + 2
    assert load_pretrained(out / "model").config.num_frames == 8
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
