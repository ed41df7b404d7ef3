"""The network: published sizes and key layout, shapes, the zero-video rule, bad input."""

from __future__ import annotations

import pytest
import torch

from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _inputs(cfg: ModelConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, 800, generator=g), torch.randn(
        batch, *cfg.video_shape, generator=g
    )


def test_published_sizes_and_keys():
    model = SmartTurnMultimodal(ModelConfig.published())
    audio = _count(model.encoder) + _count(model.pool_attention) + _count(model.classifier)
    assert audio == pytest.approx(8.0, abs=0.1)
    assert _count(model.video_backbone) == pytest.approx(33.3, abs=0.1)
    assert _count(model.fusion_layer) == pytest.approx(0.25, abs=0.01)
    assert _count(model) == pytest.approx(41.5, abs=0.1)
    keys = set(model.state_dict())
    for key in (
        "encoder.conv1.weight",
        "encoder.embed_positions.weight",
        "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.3.fc2.bias",
        "encoder.layer_norm.weight",
        "pool_attention.0.weight",
        "pool_attention.2.bias",
        "classifier.0.weight",
        "classifier.1.weight",
        "classifier.4.weight",
        "classifier.6.bias",
        "video_backbone.stem.0.weight",
        "video_backbone.stem.1.running_var",
        "video_backbone.layer1.0.conv1.0.weight",
        "video_backbone.layer1.0.conv1.1.bias",
        "video_backbone.layer2.0.downsample.0.weight",
        "video_backbone.layer4.1.conv2.1.weight",
        "video_backbone.fc.weight",
        "video_backbone.fc.bias",
        "fusion_layer.0.weight",
        "fusion_layer.1.bias",
    ):
        assert key in keys, key
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"encoder", "pool_attention", "classifier", "video_backbone", "fusion_layer"}
    assert model.encoder.embed_positions.weight.shape == (400, 384)
    assert model.video_backbone.fc.weight.shape == (256, 512)


def test_audio_only_config_has_no_video_parts():
    model = SmartTurnMultimodal(ModelConfig.tiny(with_video=False)).eval()
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"encoder", "pool_attention", "classifier"}
    x, v = _inputs(model.config)
    assert model(x).shape == (2, 1)
    with pytest.raises(ValueError, match="audio-only"):
        model(x, v)


def test_shapes_and_batch_independence(tiny_model):
    x, v = _inputs(tiny_model.config, batch=3)
    with torch.no_grad():
        out = tiny_model(x, v)
        single = tiny_model(x[1:2], v[1:2])
    assert out.shape == (3, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-5)


def test_zero_video_rule_skips_backbone(tiny_model):
    """No video = the zero embedding, and the backbone does not run (SPEC 2)."""
    calls = []
    tiny_model.video_backbone.register_forward_hook(lambda *a: calls.append(a[2].shape[0]))
    with torch.no_grad():  # trained-like BN statistics, so zero pixels give a non-zero embedding
        tiny_model.video_backbone.stem[1].bias.fill_(0.5)
        tiny_model.video_backbone.fc.weight.normal_(0, 1.0)
    x, v = _inputs(tiny_model.config)
    with torch.no_grad():
        no_video = tiny_model(x)
        masked = tiny_model(x, v, video_mask=torch.tensor([False, False]))
        zero = tiny_model.head(tiny_model.encode_audio(x), torch.zeros(2, 32))
        zero_pixels = tiny_model(x, torch.zeros_like(v))
    assert calls == [2], "the backbone ran for samples without video"
    torch.testing.assert_close(no_video, masked)
    torch.testing.assert_close(no_video, zero)
    # Zero pixels are NOT the same as no video (the published inference bug).
    assert not torch.allclose(no_video, zero_pixels, atol=1e-4)


def test_video_mask_mixes_samples(tiny_model):
    x, v = _inputs(tiny_model.config, batch=3)
    calls = []
    tiny_model.video_backbone.register_forward_hook(lambda *a: calls.append(a[2].shape[0]))
    with torch.no_grad():
        mixed = tiny_model(x, v, video_mask=torch.tensor([True, False, True]))
        with_video = tiny_model(x, v)
        without = tiny_model(x)
    assert calls[0] == 2, "backbone should only see the two samples with video"
    torch.testing.assert_close(mixed[[0, 2]], with_video[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], without[1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_both_branches(tiny_model):
    tiny_model.train()
    x, v = _inputs(tiny_model.config)
    tiny_model(x, v).sum().backward()
    assert tiny_model.video_backbone.stem[0].weight.grad.abs().sum() > 0
    assert tiny_model.encoder.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("features", "pixels", "match"),
    [
        (torch.zeros(1, 80, 700), None, r"input_features must have shape \(B, 80, 800\)"),
        (torch.zeros(80, 800), None, "input_features must have shape"),
        (torch.zeros(2, 80, 800), torch.zeros(1, 3, 8, 32, 32), "batch"),
        (torch.zeros(1, 80, 800), torch.zeros(1, 1, 8, 32, 32), r"pixel_values must have shape"),
    ],
)
def test_bad_shapes_raise(tiny_model, features, pixels, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(features, pixels)


def test_bad_video_mask(tiny_model):
    x, v = _inputs(tiny_model.config)
    with pytest.raises(ValueError, match="video_mask must have shape"):
        tiny_model(x, v, video_mask=torch.ones(3, dtype=torch.bool))


def test_config_round_trip_and_unknown_fields():
    cfg = ModelConfig.tiny()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "layers": 3})
    with pytest.raises(AttributeError):
        cfg.d_model = 3  # frozen
