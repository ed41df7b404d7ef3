"""The Smart Turn Multimodal network, defined once (SPEC 3).

Audio branch: Whisper-Tiny encoder (transformers ``WhisperEncoder``, 400 positions = 8 s)
-> attention pooling -> (B, d_model). Video branch: R3D-18 in plain torch with torchvision's
parameter names -> Linear -> (B, video_dim). Late fusion -> the Smart Turn v3 classifier.

``forward`` returns raw logits (B, 1); exported graphs apply the sigmoid. A sample without video
gets the zero video embedding; the backbone never sees stand-in pixels (SPEC 2).

This module imports torch and transformers only: no pipeline code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["R3D18", "ModelConfig", "SmartTurnMultimodal", "config_from_dict"]


_Config = TypeVar("_Config")


def config_from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
    """A config dataclass from its ``to_dict`` (JSON) form: an unknown field is an error that
    names the known ones; a list (or null) becomes a tuple where the field is a tuple."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(fields)}")
    values = {
        name: tuple(value or ())
        if str(fields[name].type).startswith("tuple") and (value is None or isinstance(value, list))
        else value
        for name, value in data.items()
    }
    return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of every part of the network. The defaults are the published model.

    Audio input is always (B, 80, 800) log-mel frames (the front end is fixed); the encoder's
    conv stem halves 800 frames to ``max_source_positions`` = 400 time steps.
    """

    # Whisper encoder (Whisper-Tiny).
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 400
    # Attention pooling over time.
    pool_hidden: int = 256
    # Video branch (R3D-18). ``with_video=False`` builds the audio-only Smart Turn v3 model.
    with_video: bool = True
    video_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    video_dim: int = 256
    num_frames: int = 32
    frame_size: int = 112
    # Classifier (shared with the audio-only Smart Turn v3 head).
    classifier_hidden: int = 256
    classifier_mid: int = 64
    dropout: float = 0.1

    @classmethod
    def published(cls) -> ModelConfig:
        """The published Smart Turn Multimodal sizes (about 41.5 M parameters)."""
        return cls()

    @classmethod
    def audio_only(cls) -> ModelConfig:
        """The published Smart Turn v3 audio-only sizes (about 8 M parameters)."""
        return cls(with_video=False)

    @classmethod
    def tiny(cls, with_video: bool = True) -> ModelConfig:
        """A very small model for tests and the offline quickstart (runs in milliseconds)."""
        return cls(
            d_model=64,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=128,
            pool_hidden=32,
            with_video=with_video,
            video_widths=(8, 16, 16, 32),
            video_dim=32,
            num_frames=8,
            frame_size=32,
            classifier_hidden=32,
            classifier_mid=16,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (3, self.num_frames, self.frame_size, self.frame_size)


# --------------------------------------------------------------------------- video: R3D-18


def _conv3x3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    """torchvision ``video.resnet.BasicBlock`` with ``Conv3DSimple`` convolutions."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            _conv3x3x3(in_ch, out_ch, stride), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(_conv3x3x3(out_ch, out_ch), nn.BatchNorm3d(out_ch))
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_ch),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class R3D18(nn.Module):
    """R3D-18 (torchvision ``r3d_18`` layout and parameter names), ``fc`` -> ``out_dim``.

    Input (B, 3, T, H, W) normalised with the Kinetics-400 statistics; output (B, out_dim).
    """

    def __init__(
        self, widths: tuple[int, int, int, int] = (64, 128, 256, 512), out_dim: int = 256
    ) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(
            nn.Conv3d(
                3, w1, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
            ),
            nn.BatchNorm3d(w1),
            nn.ReLU(inplace=True),
        )
        self.layer1 = nn.Sequential(_BasicBlock(w1, w1), _BasicBlock(w1, w1))
        self.layer2 = nn.Sequential(_BasicBlock(w1, w2, stride=2), _BasicBlock(w2, w2))
        self.layer3 = nn.Sequential(_BasicBlock(w2, w3, stride=2), _BasicBlock(w3, w3))
        self.layer4 = nn.Sequential(_BasicBlock(w3, w4, stride=2), _BasicBlock(w4, w4))
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(w4, out_dim)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


# --------------------------------------------------------------------------- full model


def _whisper_encoder(cfg: ModelConfig) -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    wcfg = WhisperConfig(
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim,
        num_mel_bins=cfg.num_mel_bins,
        max_source_positions=cfg.max_source_positions,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
    )
    # Eager attention exports to ONNX on every torch version and matches the published graphs.
    wcfg._attn_implementation = "eager"
    return WhisperEncoder(wcfg)


class SmartTurnMultimodal(nn.Module):
    """Whisper encoder + attention pooling (+ R3D-18 + fusion) + the Smart Turn classifier.

    State-dict keys match the published checkpoint (SPEC 3): ``encoder.*``,
    ``pool_attention.{0,2}.*``, ``classifier.{0,1,4,6}.*``, ``video_backbone.*``,
    ``fusion_layer.{0,1}.*``. With ``config.with_video=False`` it is the audio-only Smart Turn v3
    model (no ``video_backbone`` / ``fusion_layer``).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ModelConfig()
        self.encoder = _whisper_encoder(cfg)
        self.pool_attention = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.pool_hidden), nn.Tanh(), nn.Linear(cfg.pool_hidden, 1)
        )
        if cfg.with_video:
            self.video_backbone = R3D18(cfg.video_widths, cfg.video_dim)
            self.fusion_layer = nn.Sequential(
                nn.Linear(cfg.d_model + cfg.video_dim, cfg.d_model),
                nn.LayerNorm(cfg.d_model),
                nn.GELU(),
            )
        self.classifier = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.classifier_hidden),
            nn.LayerNorm(cfg.classifier_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.classifier_hidden, cfg.classifier_mid),
            nn.GELU(),
            nn.Linear(cfg.classifier_mid, 1),
        )

    # -- the three parts the exporter splits the graph into --------------------------------

    def encode_audio(self, input_features: Tensor) -> Tensor:
        """(B, 80, 800) log-mel -> (B, d_model) attention-pooled audio embedding."""
        expected = (self.config.num_mel_bins, 2 * self.config.max_source_positions)
        if input_features.ndim != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"input_features must have shape (B, {expected[0]}, {expected[1]}), "
                f"got {tuple(input_features.shape)}"
            )
        hidden = self.encoder(input_features).last_hidden_state  # (B, 400, d_model)
        weights = torch.softmax(self.pool_attention(hidden), dim=1)  # (B, 400, 1)
        return (hidden * weights).sum(dim=1)

    def encode_video(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, T, H, W) normalised face clips -> (B, video_dim) video embedding."""
        if not self.config.with_video:
            raise ValueError("this is an audio-only model (config.with_video=False)")
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (B, 3, T, H, W), got {tuple(pixel_values.shape)}"
            )
        return self.video_backbone(pixel_values)

    def head(self, audio_embedding: Tensor, video_embedding: Tensor | None = None) -> Tensor:
        """Fusion (when the model has video) and classifier -> logits (B, 1).

        ``video_embedding=None`` is the zero video embedding.
        """
        x = audio_embedding
        if self.config.with_video:
            if video_embedding is None:
                video_embedding = audio_embedding.new_zeros(x.shape[0], self.config.video_dim)
            x = self.fusion_layer(torch.cat([x, video_embedding], dim=1))
        return self.classifier(x)

    def forward(
        self,
        input_features: Tensor,
        pixel_values: Tensor | None = None,
        video_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, 1) for (B, 80, 800) features and optional (B, 3, T, H, W) clips.

        ``video_mask`` (B,) bool marks the samples that have video; the others (and every sample
        when ``pixel_values`` is None) get the zero video embedding, and the backbone runs only
        on the samples with video.
        """
        audio = self.encode_audio(input_features)
        if not self.config.with_video:
            if pixel_values is not None:
                raise ValueError("this is an audio-only model: pass pixel_values=None")
            return self.head(audio)
        video = None
        if pixel_values is not None:
            batch = input_features.shape[0]
            if pixel_values.shape[0] != batch:
                raise ValueError(
                    f"pixel_values batch {pixel_values.shape[0]} != input_features batch {batch}"
                )
            if video_mask is None:
                video = self.encode_video(pixel_values)
            else:
                if video_mask.shape != (batch,):
                    raise ValueError(
                        f"video_mask must have shape ({batch},), got {tuple(video_mask.shape)}"
                    )
                mask = video_mask.to(device=pixel_values.device, dtype=torch.bool)
                video = audio.new_zeros(batch, self.config.video_dim)
                if bool(mask.any()):
                    video[mask] = self.encode_video(pixel_values[mask]).to(video.dtype)
        return self.head(audio, video)

    # -- groups used by the training recipe --------------------------------------------------

    def audio_parameters(self) -> list[nn.Parameter]:
        """Encoder, pooling and classifier: the Smart Turn v3 part (frozen in stage 1)."""
        return [
            *self.encoder.parameters(),
            *self.pool_attention.parameters(),
            *self.classifier.parameters(),
        ]

    def video_parameters(self) -> list[nn.Parameter]:
        """Video backbone and fusion (trained in stage 1)."""
        if not self.config.with_video:
            return []
        return [*self.video_backbone.parameters(), *self.fusion_layer.parameters()]
