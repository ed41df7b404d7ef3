"""Split a combined audio-visual ONNX graph at the fusion boundary.

A combined graph (``input_features`` [B, 80, 800], ``pixel_values`` [B, 3, T, H, W] ->
``logits`` [B, 1]) always runs the video backbone. Split into three graphs, an audio-only call
runs the audio encoder and the small head with the zero video embedding, and never the
backbone (SPEC 2):

- ``<stem>.audio.onnx``: ``input_features`` -> ``audio_embedding`` [B, d]
- ``<stem>.video.onnx``: ``pixel_values`` -> ``video_embedding`` [B, v]
- ``<stem>.head.onnx``: ``audio_embedding``, ``video_embedding`` -> ``logits`` [B, 1]

The boundary is found from the graph itself (the Concat whose two inputs depend on one model
input each), so it works on our fp32 and int8 exports and on other exporters' graphs of the
published architecture. The three parts hold the combined graph's own nodes, so
``head(audio(x), video(v))`` computes exactly what ``combined(x, v)`` does.

Imported by the inference path: ``onnx`` is imported inside the functions only (never torch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from smart_turn_mm.locations import atomic_path, sha256_file

if TYPE_CHECKING:
    import onnx

__all__ = [
    "AUDIO_EMBEDDING",
    "AUDIO_INPUT",
    "PARTS",
    "VIDEO_EMBEDDING",
    "VIDEO_INPUT",
    "find_fusion_boundary",
    "split_combined",
    "split_paths",
    "tensor_dependencies",
]

# The published graph I/O names (SPEC 4) and the names of the boundary tensors.
AUDIO_INPUT = "input_features"
VIDEO_INPUT = "pixel_values"
OUTPUT = "logits"
AUDIO_EMBEDDING = "audio_embedding"
VIDEO_EMBEDDING = "video_embedding"
# Split part -> file-name suffix before ".onnx".
PARTS = ("audio", "video", "head")
# Metadata keys written on each part.
PART_KEY = "smart_turn_mm.part"
SOURCE_SHA256_KEY = "smart_turn_mm.split_source_sha256"


def split_paths(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """The file names :func:`split_combined` writes for ``path`` (they may not exist yet).

    ``model.onnx`` -> ``{"audio": model.audio.onnx, "video": model.video.onnx,
    "head": model.head.onnx}``, beside ``path`` or in ``out_dir``.
    """
    path = Path(path)
    folder = Path(out_dir) if out_dir is not None else path.parent
    stem = path.name.removesuffix(".onnx")
    return {part: folder / f"{stem}.{part}.onnx" for part in PARTS}


# --------------------------------------------------------------------------- graph analysis


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
        local.update(node.output)
    return used - local


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [n for n in node.input if n]
    for sub in _subgraphs(node):
        names.extend(sorted(_outer_names(sub)))
    return names


def _graph_inputs(graph: onnx.GraphProto) -> list[str]:
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where producers come first (ONNX graphs usually are)."""
    produced = {o for node in graph.node for o in node.output if o}
    ready = set(_graph_inputs(graph)) | {i.name for i in graph.initializer}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        left = []
        for node in pending:
            if all(n in ready or n not in produced for n in _node_inputs(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ValueError(f"the graph has a cycle (at node {left[0].name!r})")
        pending = left
    return ordered


def tensor_dependencies(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    """For every tensor of the main graph, the set of graph inputs it depends on.

    Initialisers and constants depend on nothing (the empty set).
    """
    graph = model.graph
    deps: dict[str, frozenset[str]] = {name: frozenset((name,)) for name in _graph_inputs(graph)}
    empty: frozenset[str] = frozenset()
    for node in _topological(graph):
        found = empty.union(*(deps.get(n, empty) for n in _node_inputs(node)))
        for out in node.output:
            if out:
                deps[out] = found
    return deps


def _concat_axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def find_fusion_boundary(model: onnx.ModelProto) -> tuple[str, str]:
    """The (audio embedding, video embedding) tensor names of a combined graph.

    They are the two inputs of the Concat (axis 1 or -1) where one input depends, through any
    chain of nodes (Quantize/DequantizeLinear included), on ``input_features`` alone and the
    other on ``pixel_values`` alone.

    Raises:
        ValueError: the graph lacks one of the two inputs, or has no such Concat, or several.
    """
    inputs = _graph_inputs(model.graph)
    missing = [name for name in (AUDIO_INPUT, VIDEO_INPUT) if name not in inputs]
    if missing:
        raise ValueError(
            f"not a combined audio-visual graph: inputs {inputs}, missing {missing} "
            f"(expected {AUDIO_INPUT!r} and {VIDEO_INPUT!r})"
        )
    deps = tensor_dependencies(model)
    audio_only, video_only = frozenset((AUDIO_INPUT,)), frozenset((VIDEO_INPUT,))
    found: list[tuple[str, str, str]] = []
    for node in model.graph.node:
        if node.op_type != "Concat" or _concat_axis(node) not in (1, -1) or len(node.input) != 2:
            continue
        a, b = node.input
        if deps.get(a) == audio_only and deps.get(b) == video_only:
            found.append((a, b, node.name))
        elif deps.get(a) == video_only and deps.get(b) == audio_only:
            found.append((b, a, node.name))
    if not found:
        raise ValueError(
            "no fusion boundary found: no Concat (axis 1) joins a tensor computed from "
            f"{AUDIO_INPUT!r} alone with one computed from {VIDEO_INPUT!r} alone; "
            "is this the Smart Turn Multimodal late-fusion architecture?"
        )
    if len(found) > 1:
        raise ValueError(
            f"several candidate fusion boundaries (Concat nodes {[f[2] for f in found]})"
        )
    return found[0][0], found[0][1]


# --------------------------------------------------------------------------- extraction


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (subgraphs included)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for sub in _subgraphs(node):
            if old in _outer_names(sub):
                _rename(sub, old, new)
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.name == old:
            info.name = new


def _embedding_info(
    model: onnx.ModelProto, name: str, new_name: str, batch_dim: onnx.TensorShapeProto.Dimension
) -> onnx.ValueInfoProto:
    """Float32 [batch, width] value info for a boundary tensor; ``batch`` copied from an input."""
    import onnx

    infos = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    width: int | None = None
    info = infos.get(name)
    if info is not None and info.type.tensor_type.HasField("shape"):
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            width = dims[1].dim_value
    out = onnx.helper.make_tensor_value_info(new_name, onnx.TensorProto.FLOAT, [None, width])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    return out


def _check_closed(part: onnx.ModelProto, what: str) -> None:
    """Every tensor a part reads must be a graph input, an initialiser or made inside it."""
    graph = part.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        unknown = [n for n in _node_inputs(node) if n not in known]
        if unknown:
            raise ValueError(
                f"the {what} part of the graph needs tensors from across the fusion boundary "
                f"({unknown[:3]} at node {node.name!r}); this graph cannot be split"
            )
        known.update(node.output)


def _writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output directory {folder} for split graphs: {e}") from e
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write split graphs to {folder}: not a writable directory "
            "(pass out_dir= a writable directory)"
        )


def save_model_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Save a single-file ONNX model via a temporary file in the same directory + os.replace."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def _set_metadata(model: onnx.ModelProto, values: Iterable[tuple[str, str]]) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props.update(values)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def split_model(model: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """Split a combined model (in memory) into ``{"audio", "video", "head"}`` models."""
    import onnx

    audio_name, video_name = find_fusion_boundary(model)
    inferred = model
    have = {v.name for v in model.graph.value_info}
    if audio_name not in have or video_name not in have:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # shapes are optional here: the boundary infos are built below anyway
            inferred = model
    by_name = {i.name: i for i in inferred.graph.input}
    batch_dim = by_name[AUDIO_INPUT].type.tensor_type.shape.dim[0]

    # The Extractor needs value infos for the cut tensors: add float [B, d] ones if missing.
    work = onnx.ModelProto()
    work.CopyFrom(inferred)
    present = {v.name for v in work.graph.value_info}
    for name in (audio_name, video_name):
        if name not in present:
            work.graph.value_info.append(_embedding_info(inferred, name, name, batch_dim))
    extractor = onnx.utils.Extractor(work)
    parts = {
        "audio": extractor.extract_model([AUDIO_INPUT], [audio_name]),
        "video": extractor.extract_model([VIDEO_INPUT], [video_name]),
        "head": extractor.extract_model([audio_name, video_name], [OUTPUT]),
    }
    renames = {audio_name: AUDIO_EMBEDDING, video_name: VIDEO_EMBEDDING}
    taken = {o for node in model.graph.node for o in node.output} | set(_graph_inputs(model.graph))
    for old, new in renames.items():
        if new in taken and new != old:
            raise ValueError(f"the graph already has a tensor named {new!r}; cannot rename {old!r}")
    for part_name, part in parts.items():
        graph = part.graph
        for old, new in renames.items():
            _rename(graph, old, new)
        # Boundary I/O as float [B, d] with the input's batch dimension (dynamic batch).
        for io in (graph.input, graph.output):
            for i, info in enumerate(io):
                if info.name in renames.values():
                    old = next(k for k, v in renames.items() if v == info.name)
                    io[i].CopyFrom(_embedding_info(inferred, old, info.name, batch_dim))
        io_names = {i.name for i in graph.input} | {o.name for o in graph.output}
        kept = [v for v in graph.value_info if v.name not in io_names]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        _check_closed(part, part_name)
        part.ir_version = model.ir_version
        part.producer_name = model.producer_name
        part.producer_version = model.producer_version
        part.doc_string = model.doc_string
        graph.name = f"{model.graph.name or 'model'}.{part_name}"
        del part.opset_import[:]
        part.opset_import.extend(model.opset_import)
        _set_metadata(
            part, [*((p.key, p.value) for p in model.metadata_props), (PART_KEY, part_name)]
        )
    return parts


def split_combined(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Split a combined ``.onnx`` file into audio, video and head graphs; return their paths.

    Files are named as :func:`split_paths` says, written beside ``path`` (or in ``out_dir``),
    each atomically (temporary file + ``os.replace``). They keep the combined graph's opset,
    metadata (plus ``smart_turn_mm.part`` and ``smart_turn_mm.split_source_sha256``, the
    SHA-256 of the combined file) and dynamic batch.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a combined graph with a fusion boundary (see :func:`find_fusion_boundary`).
        PermissionError: the output directory is not writable.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    targets = split_paths(path, out_dir)
    _writable_dir(next(iter(targets.values())).parent)
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ValueError(f"cannot read ONNX file {path}: {e}") from e
    parts = split_model(model)
    source_sha = sha256_file(path)
    for name, part in parts.items():
        _set_metadata(part, [(SOURCE_SHA256_KEY, source_sha)])
        save_model_atomic(part, targets[name])
    return targets
