"""Splitting a combined audio-visual graph at the fusion boundary (graph_split)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from signals import speech_like

from smart_turn_mm import graph_split
from smart_turn_mm.audio import whisper_features


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torchscript_export(model, path) -> None:
    """Another exporter's graph of the architecture: the legacy TorchScript exporter."""
    import warnings

    import torch

    class Prob(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_features, pixel_values):
            return torch.sigmoid(self.inner(input_features, pixel_values))

    x = torch.zeros(2, 80, 800)
    v = torch.zeros(2, *model.config.video_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Prob().eval(),
            (x, v),
            str(path),
            dynamo=False,
            input_names=["input_features", "pixel_values"],
            output_names=["logits"],
            dynamic_axes={n: {0: "batch"} for n in ("input_features", "pixel_values", "logits")},
            opset_version=17,
        )


@pytest.fixture(scope="module")
def combined(tmp_path_factory, request):
    import torch

    from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal

    torch.manual_seed(0)
    model = SmartTurnMultimodal(ModelConfig.tiny()).eval()
    path = tmp_path_factory.mktemp("split") / "combined.onnx"
    _torchscript_export(model, path)
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="smart_turn_mm.no_video", value="zero_embedding")
    onnx.save(proto, str(path))
    return path, model


def _inputs(model, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.stack([whisper_features(speech_like(1.0 + i, seed=seed + i)) for i in range(batch)])
    pixels = rng.standard_normal((batch, *model.config.video_shape)).astype(np.float32)
    return x, pixels


def _assert_split_identical(path, parts, model) -> None:
    full = _session(path)
    audio, video, head = (_session(parts[k]) for k in ("audio", "video", "head"))
    for batch in (1, 3):
        x, pixels = _inputs(model, batch, seed=batch)
        for pv in (pixels, np.zeros_like(pixels)):  # real clips and zero pixels
            expected = full.run(None, {"input_features": x, "pixel_values": pv})[0]
            a = audio.run(None, {"input_features": x})[0]
            v = video.run(None, {"pixel_values": pv})[0]
            got = head.run(None, {"audio_embedding": a, "video_embedding": v})[0]
            assert got.shape == expected.shape == (batch, 1)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_boundary_of_a_torchscript_graph(combined):
    path, _ = combined
    proto = onnx.load(str(path))
    audio_name, video_name = graph_split.find_fusion_boundary(proto)
    deps = graph_split.tensor_dependencies(proto)
    assert deps[audio_name] == {"input_features"}
    assert deps[video_name] == {"pixel_values"}
    # The legacy graph has many shape Concats; only one joins the two branches.
    assert sum(n.op_type == "Concat" for n in proto.graph.node) > 1


def test_split_is_identical_to_the_combined_graph(combined, tmp_path):
    path, model = combined
    parts = graph_split.split_combined(path, tmp_path)
    assert parts == graph_split.split_paths(path, tmp_path)
    assert [p.name for p in parts.values()] == [
        "combined.audio.onnx",
        "combined.video.onnx",
        "combined.head.onnx",
    ]
    _assert_split_identical(path, parts, model)


def test_split_files_keep_opset_metadata_and_dynamic_batch(combined, tmp_path):
    path, model = combined
    parts = graph_split.split_combined(path, tmp_path)
    source = onnx.load(str(path))
    cfg = model.config
    expected_io = {
        "audio": ({"input_features": [80, 800]}, {"audio_embedding": [cfg.d_model]}),
        "video": ({"pixel_values": list(cfg.video_shape)}, {"video_embedding": [cfg.video_dim]}),
        "head": (
            {"audio_embedding": [cfg.d_model], "video_embedding": [cfg.video_dim]},
            {"logits": [1]},
        ),
    }
    for name, part_path in parts.items():
        part = onnx.load(str(part_path))
        onnx.checker.check_model(part)
        assert list(part.opset_import) == list(source.opset_import)
        meta = {p.key: p.value for p in part.metadata_props}
        assert meta["smart_turn_mm.no_video"] == "zero_embedding"
        assert meta["smart_turn_mm.part"] == name
        assert len(meta["smart_turn_mm.split_source_sha256"]) == 64
        for values, expected in zip(
            (part.graph.input, part.graph.output), expected_io[name], strict=True
        ):
            shapes = {v.name: v.type.tensor_type.shape.dim for v in values}
            assert set(shapes) == set(expected)
            for tensor, dims in shapes.items():
                assert dims[0].dim_param == "batch", (name, tensor)
                assert [d.dim_value for d in dims[1:]] == expected[tensor]


def test_split_beside_the_file_is_atomic_and_replaces(combined, tmp_path):
    path, _ = combined
    copy = tmp_path / "m.onnx"
    copy.write_bytes(path.read_bytes())
    first = graph_split.split_combined(copy)
    assert all(p.parent == tmp_path for p in first.values())
    again = graph_split.split_combined(copy)  # replacing existing files works
    assert again == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.audio.onnx",
        "m.head.onnx",
        "m.onnx",
        "m.video.onnx",
    ]  # no temporary files left behind


def test_split_of_an_int8_qdq_graph_with_every_op_quantised(combined, tmp_path):
    """A QDQ graph (Concat itself quantised) splits into parts that compute the same thing."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path, model = combined

    class Reader:
        def __init__(self) -> None:
            names = ("input_features", "pixel_values")
            self.items = iter(
                [dict(zip(names, _inputs(model, 1, s), strict=True)) for s in range(4)]
            )

        def get_next(self):
            return next(self.items, None)

    int8 = tmp_path / "int8.onnx"
    quantize_static(
        str(path),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    proto = onnx.load(str(int8))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    boundary = graph_split.find_fusion_boundary(proto)
    assert [producers[name] for name in boundary] == ["DequantizeLinear"] * 2
    parts = graph_split.split_combined(int8)
    _assert_split_identical(int8, parts, model)


# --------------------------------------------------------------------------- errors


def _tiny_graph(with_concat: bool = True, video_input: bool = True) -> onnx.ModelProto:
    """input_features (B,2) and pixel_values (B,3) -> Relu each -> Concat/Add -> logits."""
    inputs = [helper.make_tensor_value_info("input_features", TensorProto.FLOAT, ["batch", 2])]
    nodes = [helper.make_node("Relu", ["input_features"], ["a"])]
    if video_input:
        inputs.append(
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3])
        )
        nodes.append(helper.make_node("Relu", ["pixel_values"], ["v"]))
    if with_concat and video_input:
        nodes.append(helper.make_node("Concat", ["a", "v"], ["cat"], axis=1))
        nodes.append(helper.make_node("ReduceSum", ["cat"], ["logits"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceSum", ["a"], ["logits"], keepdims=1))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(nodes, "g", inputs, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_tiny_handmade_graph_splits(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_graph(), str(path))
    assert graph_split.find_fusion_boundary(onnx.load(str(path))) == ("a", "v")
    parts = graph_split.split_combined(path)
    head = _session(parts["head"])
    a = np.array([[1.0, 2.0]], np.float32)
    v = np.array([[3.0, 4.0, 5.0]], np.float32)
    got = head.run(None, {"audio_embedding": a, "video_embedding": v})[0]
    assert got.tolist() == [[15.0]]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="missing \\['pixel_values'\\]"):
        graph_split.find_fusion_boundary(_tiny_graph(video_input=False))
    with pytest.raises(ValueError, match="no fusion boundary"):
        graph_split.find_fusion_boundary(_tiny_graph(with_concat=False))
    with pytest.raises(FileNotFoundError):
        graph_split.split_combined(tmp_path / "missing.onnx")
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_graph(), str(path))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(OSError, match="split graphs"):
        graph_split.split_combined(path, not_a_dir)


def test_import_needs_neither_onnx_nor_torch():
    code = (
        "import sys, smart_turn_mm.graph_split as g; "
        "assert 'onnx' not in sys.modules and 'torch' not in sys.modules; "
        "print(g.split_paths('/m/x.onnx')['head'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "/m/x.head.onnx"
