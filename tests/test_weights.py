"""Checkpoints and the pretrained initialisers (Smart Turn v3.2 ONNX, Whisper, Kinetics R3D-18)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from signals import speech_like

from smart_turn_mm.model import R3D18, ModelConfig, SmartTurnMultimodal
from smart_turn_mm.weights import (
    infer_config,
    init_audio_from_smart_turn_onnx,
    init_audio_from_whisper,
    init_video_from_kinetics,
    load_pretrained,
    save_pretrained,
    smart_turn_onnx_state_dict,
)


def _features(n: int = 4) -> np.ndarray:
    from smart_turn_mm.audio import whisper_features

    clips = []
    for i in range(n):
        audio = speech_like(2.0 + i, seed=i)
        audio[-int(0.1 * i * 16000) or len(audio) :] = 0.0  # some trailing silence
        clips.append(whisper_features(audio))
    return np.stack(clips)


def _fold_activation_qdq(path):
    """The v3.2 graph with activation Quantize/Dequantize pairs removed: its fp32 meaning."""
    import onnx

    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer}
    q_in = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts
    }
    bypass = {
        n.output[0]: q_in[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in q_in
    }
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
    return model.SerializeToString()


def test_save_load_round_trip(tmp_path, tiny_model):
    out = save_pretrained(tiny_model, tmp_path / "ckpt", extra={"note": "test"})
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "smart-turn-mm" and meta["note"] == "test"
    assert ModelConfig.from_dict(meta["model_config"]) == tiny_model.config
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(out)
    assert not loaded.training
    x = torch.randn(2, 80, 800)
    v = torch.randn(2, *tiny_model.config.video_shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, v), tiny_model(x, v))


def test_bare_published_state_dict_loads_strict(tmp_path, tiny_model):
    path = tmp_path / "published.pt"
    torch.save({"model_state_dict": tiny_model.state_dict()}, path)
    inferred = infer_config(tiny_model.state_dict())  # heads and frame sizes are not in shapes
    for field in ("d_model", "encoder_layers", "encoder_ffn_dim", "video_widths", "video_dim"):
        assert getattr(inferred, field) == getattr(tiny_model.config, field), field
    published = SmartTurnMultimodal(ModelConfig.published()).state_dict()
    assert infer_config(published) == ModelConfig.published()
    loaded = load_pretrained(path, config=tiny_model.config)
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_mismatched_state_dict_names_keys(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["classifier.6.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing \['classifier.6.bias'\].*extra.weight"):
        load_pretrained(tmp_path / "bad.pt", config=tiny_model.config)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_pretrained(tmp_path / "empty")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_pretrained(bad)


def test_v32_onnx_fills_whole_audio_branch(v32_onnx):
    state = smart_turn_onnx_state_dict(v32_onnx)
    model = SmartTurnMultimodal(ModelConfig.published())
    audio_keys = {
        k
        for k in model.state_dict()
        if k.startswith(("encoder.", "pool_attention.", "classifier."))
    }
    assert set(state) == audio_keys, "pooling and classifier must transfer, not only the encoder"
    before = model.classifier[6].weight.clone()
    init_audio_from_smart_turn_onnx(model, v32_onnx)
    assert not torch.equal(before, model.classifier[6].weight)
    torch.testing.assert_close(model.classifier[6].weight, state["classifier.6.weight"])


def test_v32_torch_matches_onnx(v32_onnx):
    """Torch (de-quantised weights) vs the v3.2 file run by ONNX Runtime on the same features.

    The weight transfer is exact: torch equals the file's graph with activation quantisation
    folded away within 1e-4. The int8 file itself (activations quantised) differs more; that
    gap is the published file's own quantisation error and is reported, not hidden.
    """
    import onnxruntime as ort

    model = SmartTurnMultimodal(ModelConfig.audio_only()).eval()
    init_audio_from_smart_turn_onnx(model, v32_onnx)
    x = _features()
    with torch.no_grad():
        p_torch = torch.sigmoid(model(torch.from_numpy(x))).numpy().ravel()
    folded = ort.InferenceSession(
        _fold_activation_qdq(v32_onnx), providers=["CPUExecutionProvider"]
    )
    p_folded = folded.run(None, {"input_features": x})[0].ravel()
    assert np.abs(p_torch - p_folded).max() <= 1e-4, (p_torch, p_folded)
    int8 = ort.InferenceSession(str(v32_onnx), providers=["CPUExecutionProvider"])
    p_int8 = int8.run(None, {"input_features": x})[0].ravel()
    assert np.all((p_int8 >= 0) & (p_int8 <= 1))


def test_whisper_init_slices_positions(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    cfg = ModelConfig.tiny(with_video=False)
    whisper = WhisperModel(
        WhisperConfig(
            d_model=cfg.d_model,
            encoder_layers=cfg.encoder_layers,
            decoder_layers=1,
            encoder_attention_heads=cfg.encoder_attention_heads,
            decoder_attention_heads=2,
            encoder_ffn_dim=cfg.encoder_ffn_dim,
            decoder_ffn_dim=32,
            vocab_size=100,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            max_source_positions=1500,
            max_target_positions=16,
        )
    )
    whisper.save_pretrained(tmp_path / "whisper")
    model = SmartTurnMultimodal(cfg)
    init_audio_from_whisper(model, str(tmp_path / "whisper"), local_files_only=True)
    src = whisper.encoder.state_dict()
    torch.testing.assert_close(
        model.encoder.embed_positions.weight, src["embed_positions.weight"][:400]
    )
    torch.testing.assert_close(model.encoder.layers[0].fc1.weight, src["layers.0.fc1.weight"])


def test_kinetics_init_from_local_file(tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(1)
    kinetics = R3D18(cfg.video_widths, out_dim=400)  # torchvision layout, 400 classes
    torch.save(kinetics.state_dict(), tmp_path / "r3d_18.pth")
    model = SmartTurnMultimodal(cfg)
    fc_before = model.video_backbone.fc.weight.clone()
    init_video_from_kinetics(model, tmp_path / "r3d_18.pth")
    torch.testing.assert_close(model.video_backbone.stem[0].weight, kinetics.stem[0].weight)
    torch.testing.assert_close(
        model.video_backbone.layer4[1].conv2[1].running_var, kinetics.layer4[1].conv2[1].running_var
    )
    torch.testing.assert_close(model.video_backbone.fc.weight, fc_before)
    with pytest.raises(FileNotFoundError, match="R3D-18 weights file not found"):
        init_video_from_kinetics(model, tmp_path / "missing.pth")
