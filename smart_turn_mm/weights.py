"""Weights in and out: self-describing checkpoints and the pretrained initialisers.

A checkpoint is a directory (Hub layout) with ``config.json`` (format, version, the
``ModelConfig``, anything the trainer adds) and ``model.safetensors``. ``load_pretrained`` also
reads a single ``.safetensors`` file and the published torch state dicts (``.pt``/``.pth``/``.bin``,
loaded with ``weights_only=True``), and Hub repositories when online.

Initialisers for the audio branch: ``openai/whisper-tiny`` (transformers, positions sliced
1500 -> 400) and a Smart Turn v3 ONNX file (QDQ weights de-quantised into ``encoder``,
``pool_attention`` AND ``classifier``); for the video branch: torchvision's Kinetics-400 R3D-18.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smart_turn_mm.locations import atomic_path, find_smart_turn_v3_onnx
from smart_turn_mm.model import ModelConfig, SmartTurnMultimodal

__all__ = [
    "KINETICS_R3D18_URL",
    "find_smart_turn_v3_onnx",
    "infer_config",
    "init_audio_from_smart_turn_onnx",
    "init_audio_from_whisper",
    "init_video_from_kinetics",
    "load_pretrained",
    "load_state_dict",
    "save_pretrained",
    "smart_turn_onnx_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "smart-turn-mm"
FORMAT_VERSION = 1
# torchvision's published Kinetics-400 R3D-18 weights; the hex suffix is a SHA-256 prefix that
# torch.hub checks.
KINETICS_R3D18_URL = "https://download.pytorch.org/models/r3d_18-b3b3357e.pth"
AUDIO_PREFIXES = ("encoder.", "pool_attention.", "classifier.")


# --------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` with ``write(tmp)`` via :func:`~smart_turn_mm.locations.atomic_path`."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_pretrained(
    model: SmartTurnMultimodal,
    directory: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` as ``directory/{config.json, model.safetensors}``, each written atomically.

    ``extra`` (JSON-serialisable, e.g. the training config and metrics) is stored in config.json.
    """
    from safetensors.torch import save_file

    from smart_turn_mm import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_config": model.config.to_dict(),
        **dict(extra or {}),
    }
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(
        out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    )
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Rebuild a ``ModelConfig`` from a state dict's shapes (for bare published checkpoints).

    Attention heads cannot be read from shapes; Whisper's 64-wide heads are assumed.
    """
    try:
        d_model = state_dict["encoder.conv1.weight"].shape[0]
        layers = 1 + max(
            int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers.")
        )
        values: dict[str, Any] = {
            "d_model": d_model,
            "encoder_layers": layers,
            "encoder_attention_heads": max(1, d_model // 64),
            "encoder_ffn_dim": state_dict["encoder.layers.0.fc1.weight"].shape[0],
            "num_mel_bins": state_dict["encoder.conv1.weight"].shape[1],
            "max_source_positions": state_dict["encoder.embed_positions.weight"].shape[0],
            "pool_hidden": state_dict["pool_attention.0.weight"].shape[0],
            "classifier_hidden": state_dict["classifier.0.weight"].shape[0],
            "classifier_mid": state_dict["classifier.4.weight"].shape[0],
            "with_video": "video_backbone.fc.weight" in state_dict,
        }
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a Smart Turn state dict: cannot infer the model config ({e})") from e
    if values["with_video"]:
        values["video_widths"] = tuple(
            state_dict[f"video_backbone.layer{i}.0.conv1.0.weight"].shape[0] for i in (1, 2, 3, 4)
        )
        values["video_dim"] = state_dict["video_backbone.fc.weight"].shape[0]
    return ModelConfig(**values)


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or common wrappers ({"model_state_dict": ...}, DDP "module.")."""
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_state_dict(
    model: SmartTurnMultimodal, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Load a published-layout state dict; on mismatch, name the missing and unexpected keys."""
    result = model.load_state_dict(dict(state_dict), strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            "state dict does not match the model: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    return _unwrap_state_dict(obj)


def load_pretrained(
    source: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> SmartTurnMultimodal:
    """Load a model from a checkpoint directory, a weights file or a Hugging Face Hub repo id.

    The model is returned in eval mode. ``config`` overrides what the checkpoint says (needed
    only for bare state dicts whose shapes do not tell everything).
    """
    path = Path(source)
    meta: dict[str, Any] = {}
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pt*"))
            if not candidates:
                raise FileNotFoundError(f"no {WEIGHTS_NAME} (or .safetensors/.pt file) in {path}")
            weights = candidates[0]
        if (path / CONFIG_NAME).is_file():
            meta = json.loads((path / CONFIG_NAME).read_text())
    elif path.is_file():
        weights = path
    elif path.suffix or os.sep in str(source) or str(source).startswith("."):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:  # a Hub repo id such as "user/model"
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(source),
            revision=revision,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            local_files_only=local_files_only,
        )
        return load_pretrained(local, config=config)
    state = _read_weights_file(weights)
    if config is None:
        config = (
            ModelConfig.from_dict(meta["model_config"])
            if "model_config" in meta
            else infer_config(state)
        )
    model = SmartTurnMultimodal(config)
    load_state_dict(model, state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- audio initialisers


def init_audio_from_whisper(
    model: SmartTurnMultimodal,
    name_or_path: str = "openai/whisper-tiny",
    *,
    local_files_only: bool = False,
) -> None:
    """Copy a pretrained Whisper encoder into ``model.encoder`` (positions sliced to fit)."""
    from transformers import WhisperModel

    whisper = WhisperModel.from_pretrained(name_or_path, local_files_only=local_files_only)
    state = whisper.get_encoder().state_dict()
    positions = model.config.max_source_positions
    state["embed_positions.weight"] = state["embed_positions.weight"][:positions].clone()
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{name_or_path} does not fit the audio encoder (config {model.config}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int
) -> np.ndarray:
    q = q.astype(np.float32)
    zp = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:  # per-channel along ``axis``
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale.astype(np.float32)


def smart_turn_onnx_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Smart Turn v3 ONNX file (fp32 or int8 QDQ) back into ``encoder``,
    ``pool_attention`` and ``classifier`` torch tensors with the published key names.

    Named initialisers map directly (``inner.`` prefix dropped). MatMul weights that the exporter
    renamed (``val_N``, stored transposed) are found through the graph: the bias ``Add`` that
    follows each MatMul names the layer; ``k_proj`` (no bias) is the third MatMul reading the
    same input as ``q_proj`` and ``v_proj``.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Smart Turn ONNX file not found: {path}")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise ValueError(f"cannot read ONNX file {path}: {e}") from e
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    # Fold every DequantizeLinear whose inputs are all constants.
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(i in consts for i in node.input if i):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            consts[node.output[0]] = _dequantize(
                consts[node.input[0]], consts[node.input[1]], zp, axis
            )

    def through_qdq(name: str) -> str:
        """Walk back over (De)QuantizeLinear nodes to the tensor they carry."""
        while name in producer and producer[name].op_type in ("DequantizeLinear", "QuantizeLinear"):
            if name in consts:
                return name
            name = producer[name].input[0]
        return name

    def key_of(name: str) -> str | None:
        for suffix in ("_DequantizeLinear_Output", "_quantized"):
            name = name.removesuffix(suffix)
        if name.startswith("inner."):
            name = name.removeprefix("inner.")
        if name.startswith(AUDIO_PREFIXES) and name.endswith((".weight", ".bias")):
            return name
        return None

    state: dict[str, np.ndarray] = {}
    for node in graph.node:  # directly named tensors
        for name in node.output if node.op_type == "DequantizeLinear" else ():
            if name in consts and (key := key_of(name)):
                state[key] = consts[name]
    for name, value in list(consts.items()):
        if (key := key_of(name)) and key not in state and value.dtype == np.float32:
            state[key] = value

    matmul_inputs: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul":
            matmul_inputs.setdefault(through_qdq(node.input[0]), []).append(node)

    def matmul_weight(node: onnx.NodeProto) -> np.ndarray | None:
        w = node.input[1]
        return consts.get(w) if w in consts else consts.get(through_qdq(w))

    biased: dict[str, str] = {}  # MatMul output -> the layer its bias Add names
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2:
            bias_key = key_of(node.input[1])
            if bias_key and bias_key.endswith(".bias"):
                biased[through_qdq(node.input[0])] = bias_key.removesuffix(".bias")
    for node in graph.node:
        if node.op_type != "MatMul" or (w := matmul_weight(node)) is None:
            continue
        layer = biased.get(node.output[0])
        if layer is None:
            continue
        state.setdefault(f"{layer}.weight", w.T)
        if layer.endswith(".self_attn.q_proj"):  # k_proj has no bias: the unbiased sibling
            siblings = matmul_inputs.get(through_qdq(node.input[0]), [])
            rest = [n for n in siblings if n.output[0] not in biased]
            if len(rest) == 1 and (kw := matmul_weight(rest[0])) is not None:
                state.setdefault(layer.replace("q_proj", "k_proj") + ".weight", kw.T)
    return {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def init_audio_from_smart_turn_onnx(
    model: SmartTurnMultimodal, path: str | os.PathLike | None = None
) -> Path:
    """Load encoder, pooling AND classifier from a Smart Turn v3 ONNX file (default: the v3.2
    file shipped in ``pipecat-ai``). Every audio key of ``model`` must be filled. Returns the path.
    """
    if path is None:
        path = find_smart_turn_v3_onnx()
        if path is None:
            raise FileNotFoundError(
                "no Smart Turn v3 ONNX given and none found in an installed pipecat-ai package "
                "(pip install pipecat-ai, or pass the path of smart-turn-v3.x.onnx)"
            )
    state = smart_turn_onnx_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(AUDIO_PREFIXES)}
    missing = sorted(set(own) - set(state))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(
            f"{path} does not fit the audio branch: missing {missing[:8]}, "
            f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:4]]}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    return Path(path)


# --------------------------------------------------------------------------- video initialiser


def init_video_from_kinetics(
    model: SmartTurnMultimodal, source: str | os.PathLike = KINETICS_R3D18_URL
) -> None:
    """Load torchvision's Kinetics-400 R3D-18 weights (URL, checked by hash, or a local file)
    into ``model.video_backbone``; ``fc`` (400 classes) is left at its fresh initialisation.
    """
    if not model.config.with_video:
        raise ValueError("this is an audio-only model (config.with_video=False)")
    src = str(source)
    if src.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(
            src, map_location="cpu", check_hash=True, progress=True
        )
    else:
        if not Path(src).is_file():
            raise FileNotFoundError(f"R3D-18 weights file not found: {src}")
        state = _read_weights_file(Path(src))
    state = {k: v for k, v in _unwrap_state_dict(state).items() if not k.startswith("fc.")}
    missing, unexpected = model.video_backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{src} is not an R3D-18 state dict for widths {model.config.video_widths}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
