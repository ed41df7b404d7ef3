"""ONNX export: files, I/O, metadata, parity, int8 agreement, split graphs, the report."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from media import face_frames, write_test_video
from signals import speech_like

from smart_turn_mm import export as E
from smart_turn_mm import graph_split
from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal
from smart_turn_mm.weights import save_pretrained, smart_turn_onnx_state_dict

NUM_SAMPLES = 6


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A SPEC 5 dataset folder: speech-like WAVs and small face-cropped MP4 clips."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "audio").mkdir()
    (root / "video").mkdir()
    rows = []
    for i in range(NUM_SAMPLES):
        audio = speech_like(1.5 + 0.5 * i, seed=i)
        complete = bool(i % 2)
        if complete:
            audio[-4000:] = 0.0  # a pause at the end
        _write_wav(root / f"audio/s{i}.wav", audio)
        # The face region of the test frames, already cropped square (as prepared datasets are).
        frames = [f[108:236, 96:224][::2, ::2].copy() for f in face_frames(10 + i)]
        write_test_video(root / f"video/s{i}.mp4", frames)
        rows.append(
            {
                "file_name": f"audio/s{i}.wav",
                "id": f"s{i}",
                "language": "eng",
                "endpoint_bool": complete,
                "midfiller": False,
                "endfiller": False,
                "synthetic": True,
                "spoken_text": "",
                "dataset": "test",
                "video_path": f"video/s{i}.mp4",
                "visual_label": None,
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def av_model() -> SmartTurnMultimodal:
    torch.manual_seed(0)
    return SmartTurnMultimodal(ModelConfig.tiny()).eval()


@pytest.fixture(scope="module")
def av_export(tmp_path_factory, av_model, dataset):
    """A tiny audio-visual checkpoint exported to fp32 + int8 from its directory."""
    ckpt = save_pretrained(av_model, tmp_path_factory.mktemp("ckpt"))
    out = tmp_path_factory.mktemp("export")
    report = E.export_onnx(ckpt, out, calibration=E.CalibrationData.from_dataset(dataset))
    return out, report


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_prob(model, x, pixels=None) -> np.ndarray:
    with torch.no_grad():
        px = None if pixels is None else torch.from_numpy(pixels)
        return torch.sigmoid(model(torch.from_numpy(x), px)).numpy()


def _random_inputs(config: ModelConfig, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 80, 800)).astype(np.float32)
    pixels = rng.standard_normal((batch, *config.video_shape)).astype(np.float32)
    return x, pixels


# --------------------------------------------------------------------------- files and I/O


def test_files_written(av_export):
    out, report = av_export
    names = sorted(p.name for p in out.iterdir())
    expected = []
    for stem in ("smart-turn-multimodal-cpu", "smart-turn-multimodal-gpu"):
        expected += [f"{stem}.{part}.onnx" for part in ("audio", "head")]
        expected += [f"{stem}.onnx", f"{stem}.video.onnx"]
    assert names == sorted([*expected, "export-report.json", "export-report.md"])
    assert not list(out.glob("*.data")) and not list(out.glob(".*"))  # single files, no temps
    assert report.passed


def test_published_io_and_dynamic_batch(av_export, av_model):
    out, _ = av_export
    cfg = av_model.config
    for name in (E.MULTIMODAL_FP32, E.MULTIMODAL_INT8):
        proto = onnx.load(str(out / name))
        assert next(o.version for o in proto.opset_import if o.domain == "") == 18
        io = {v.name: v.type.tensor_type for v in (*proto.graph.input, *proto.graph.output)}
        assert list(io) == ["input_features", "pixel_values", "logits"]
        for tensor, tail in (
            ("input_features", [80, 800]),
            ("pixel_values", [3, 8, 32, 32]),  # the tiny config's own clip size
            ("logits", [1]),
        ):
            assert io[tensor].elem_type == onnx.TensorProto.FLOAT
            dims = io[tensor].shape.dim
            assert dims[0].dim_param and not dims[0].HasField("dim_value"), (name, tensor)
            assert [d.dim_value for d in dims[1:]] == tail
        session = _session(out / name)
        for batch in (1, 3):
            x, pixels = _random_inputs(cfg, batch, seed=batch)
            p = session.run(None, {"input_features": x, "pixel_values": pixels})[0]
            assert p.shape == (batch, 1) and np.all((p >= 0) & (p <= 1))  # probabilities


def test_metadata_on_every_file(av_export, av_model):
    out, _ = av_export
    files = sorted(out.glob("*.onnx"))
    assert len(files) == 8
    for path in files:
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["smart_turn_mm.version"]
        assert ModelConfig.from_dict(json.loads(meta["smart_turn_mm.model_config"])) == (
            av_model.config
        )
        assert meta["smart_turn_mm.no_video"] == "zero_embedding"
        expected = "int8" if "-cpu" in path.name else "fp32"
        assert meta["smart_turn_mm.precision"] == expected, path.name
        if expected == "int8":
            int8 = json.loads(meta["smart_turn_mm.int8"])
            assert int8["op_types"] == ["Conv"] and int8["scope"] == "video"
            assert int8["calibrate_method"] == "minmax"
            assert int8["activation_type"] == "quint8" and int8["reduce_range"] is True
        # No exporter stack traces (local paths) left on nodes.
        assert all(not n.metadata_props for n in onnx.load(str(path)).graph.node)


def test_torch_vs_fp32_onnx(av_export, av_model):
    out, _ = av_export
    session = _session(out / E.MULTIMODAL_FP32)
    x, pixels = _random_inputs(av_model.config, 3, seed=7)
    got = session.run(None, {"input_features": x, "pixel_values": pixels})[0]
    np.testing.assert_allclose(got, _torch_prob(av_model, x, pixels), rtol=0, atol=1e-4)


def test_split_graphs_equal_combined(av_export, av_model):
    """head(audio(x), video(v)) == combined(x, v), and the zero embedding matches torch."""
    out, _ = av_export
    cfg = av_model.config
    for name in (E.MULTIMODAL_FP32, E.MULTIMODAL_INT8):
        parts = graph_split.split_paths(out / name)
        full = _session(out / name)
        audio, video, head = (_session(parts[k]) for k in ("audio", "video", "head"))
        x, pixels = _random_inputs(cfg, 2, seed=3)
        for pv in (pixels, np.zeros_like(pixels)):
            expected = full.run(None, {"input_features": x, "pixel_values": pv})[0]
            a = audio.run(None, {"input_features": x})[0]
            v = video.run(None, {"pixel_values": pv})[0]
            got = head.run(None, {"audio_embedding": a, "video_embedding": v})[0]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        zero = np.zeros((2, cfg.video_dim), np.float32)
        no_video = head.run(
            None,
            {"audio_embedding": audio.run(None, {"input_features": x})[0], "video_embedding": zero},
        )[0]
        np.testing.assert_allclose(no_video, _torch_prob(av_model, x), rtol=0, atol=1e-4)


def test_default_int8_quantises_only_the_video_convs(av_export):
    out, _ = av_export
    parts = graph_split.split_paths(out / E.MULTIMODAL_INT8)
    video = onnx.load(str(parts["video"]))
    quantised = {n.output[0] for n in video.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in video.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[0] in quantised and n.input[1] in quantised for n in convs)
    for part in ("audio", "head"):  # the audio encoder and the head stay fp32
        ops = {n.op_type for n in onnx.load(str(parts[part])).graph.node}
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}, part
    assert (out / E.MULTIMODAL_INT8).stat().st_size < (out / E.MULTIMODAL_FP32).stat().st_size


# --------------------------------------------------------------------------- the report


def test_report(av_export):
    out, report = av_export
    data = json.loads((out / "export-report.json").read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "PASSED" and data["failures"] == []
    assert data["opset"] == 18
    for name, info in data["files"].items():
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert info["bytes"] == (out / name).stat().st_size
        assert info["opset"] == 18
    assert {"export_fp32", "quantize_int8", "validate", "split"} <= set(data["timings_s"])
    q = data["quantization"]
    assert q["calibrate_method"] == "minmax" and q["op_types"] == ["Conv"]
    # 6 samples: 2 held out (25%, rounded), the other 4 calibrate.
    assert q["calibration_samples"] == NUM_SAMPLES - 2
    assert q["calibration_peak_rss_mb"] > 0
    v = data["validation"]
    assert v["samples"] == 2 and v["samples_with_video"] == 2
    assert v["torch_vs_fp32"]["av"]["max_abs_dp"] <= 1e-4
    assert v["torch_vs_fp32"]["no_video"]["count"] == 2
    assert v["torch_vs_fp32"]["batch"]["count"] == 2
    for precision in ("fp32", "int8"):
        for mode in ("av", "zero_pixels"):
            assert v["split_vs_combined"][precision][mode]["max_abs_dp"] <= 1e-6
    for mode in ("av", "no_video"):
        assert v["int8_vs_fp32"][mode]["count"] == 2
        assert 0.0 <= v["int8_vs_fp32"][mode]["agreement"] <= 1.0
    assert any("only 2 hold-out samples" in w for w in data["warnings"])
    md = (out / "export-report.md").read_text()
    assert md.startswith("# smart-turn-mm ONNX export: PASSED")
    assert "int8_vs_fp32" in md and E.MULTIMODAL_INT8 in md


def test_a_corrupted_file_fails_validation(av_export, av_model, dataset, tmp_path):
    """Perturb the fp32 file's last bias: validation must catch it and write FAILED."""
    out, _ = av_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    path = copy / E.MULTIMODAL_FP32
    proto = onnx.load(str(path))
    bias = next(i for i in proto.graph.initializer if i.name == "inner.classifier.6.bias")
    value = onnx.numpy_helper.to_array(bias) + 0.05
    bias.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), bias.name))
    onnx.save(proto, str(path))
    _, holdout = E.CalibrationData.from_dataset(dataset).split()
    with pytest.raises(E.ExportValidationError, match="torch vs fp32") as info:
        E.validate_export(copy, av_model, holdout)
    assert info.value.report.status == "FAILED"
    data = json.loads((copy / "export-report.json").read_text())
    assert data["status"] == "FAILED"
    assert any("torch vs fp32 ONNX (av)" in f for f in data["failures"])
    # The split graphs were made from the intact file: they no longer match the combined one.
    assert any("split graphs vs combined" in f for f in data["failures"])
    assert (copy / "export-report.md").read_text().startswith("# smart-turn-mm ONNX export: FAILED")


# --------------------------------------------------------------------------- audio-only, CLI


def test_audio_only_model_exports_smart_turn_v3_io(tmp_path, dataset):
    torch.manual_seed(1)
    model = SmartTurnMultimodal(ModelConfig.tiny(with_video=False)).eval()
    with torch.no_grad():  # no two equal tensors (the exporter shares equal constants)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    report = E.export_onnx(model, tmp_path, calibration=E.CalibrationData.from_dataset(dataset))
    assert report.passed
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [
        "smart-turn-v3-cpu.onnx",
        "smart-turn-v3-gpu.onnx",
    ]
    x, _ = _random_inputs(model.config, 3)
    for name in ("smart-turn-v3-gpu.onnx", "smart-turn-v3-cpu.onnx"):
        session = _session(tmp_path / name)
        assert [i.name for i in session.get_inputs()] == ["input_features"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        assert session.run(None, {"input_features": x})[0].shape == (3, 1)
    got = _session(tmp_path / "smart-turn-v3-gpu.onnx").run(None, {"input_features": x})[0]
    np.testing.assert_allclose(got, _torch_prob(model, x), rtol=0, atol=1e-4)
    q = report.quantization
    assert q["scope"] == "all" and q["op_types"] == ["Conv"] and q["nodes_quantized"] == 2
    assert q["activation_type"] == "qint8" and q["reduce_range"] is False
    # Our file reads back through the Smart Turn v3 weight loader, like pipecat's files do.
    state = smart_turn_onnx_state_dict(tmp_path / "smart-turn-v3-gpu.onnx")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_int8_needs_real_calibration_data(av_model, tmp_path):
    with pytest.raises(ValueError, match="calibration data"):
        E.export_onnx(av_model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_command_line(tmp_path, capsys):
    import export_onnx  # the top-level script

    torch.manual_seed(2)
    model = SmartTurnMultimodal(ModelConfig.tiny(with_video=False)).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    assert export_onnx.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "calibration data" in capsys.readouterr().err
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-int8", "--json"]
    assert export_onnx.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "PASSED"
    assert "seeded random" in report["validation"]["inputs"]
    assert sorted(report["files"]) == ["smart-turn-v3-gpu.onnx"]


def test_op_types_argument():
    assert E._op_types("Conv, MatMul") == ("Conv", "MatMul")
    assert E._op_types("all") is None
    with pytest.raises(ValueError, match="empty"):
        E._op_types(" , ")


def test_percentile_calibration(av_export, av_model, dataset, tmp_path):
    out, _ = av_export
    calib, _ = E.CalibrationData.from_dataset(dataset).split()
    record = E._quantize(
        out / E.MULTIMODAL_FP32,
        tmp_path / "p.onnx",
        av_model.config,
        calib,
        op_types=("Conv",),
        scope="video",
        method="percentile",
        activation_type="qint8",
        reduce_range=False,
        percentile=99.99,
    )
    assert record["calibrate_method"] == "percentile (99.99)"
    assert record["calibration_samples"] == len(calib)
    proto = onnx.load(str(tmp_path / "p.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 0
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["smart_turn_mm.int8"])["calibrate_method"] == "percentile (99.99)"


# --------------------------------------------------------------------------- calibration data


def test_calibration_data_from_dataset(dataset):
    data = E.CalibrationData.from_dataset(dataset)
    assert len(data) == NUM_SAMPLES
    assert all(s.video is not None and s.face_crop is False for s in data.samples)
    labels = [s.label for s in data.samples]
    assert all(a != b for a, b in itertools.pairwise(labels))  # complete / incomplete alternate
    calib, hold = data.split(0.25, max_calibration=3)
    assert (len(calib), len(hold)) == (3, 2)
    assert not set(calib.samples) & set(hold.samples)
    x, pixels = hold.samples[0].features(ModelConfig.tiny())
    assert x.shape == (1, 80, 800) and pixels.shape == (1, 3, 8, 32, 32)
    assert x.dtype == pixels.dtype == np.float32


def test_calibration_data_errors(dataset, tmp_path):
    wavs = sorted((dataset / "audio").glob("*.wav"))
    with pytest.raises(ValueError, match="one video per audio"):
        E.CalibrationData.from_files(wavs, wavs[:1])
    with pytest.raises(FileNotFoundError):
        E.CalibrationData.from_files([tmp_path / "nope.wav"])
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        E.CalibrationData.from_dataset(tmp_path)
    with pytest.raises(ValueError, match="at least 2"):
        E.CalibrationData.from_files(wavs[:1]).split()
