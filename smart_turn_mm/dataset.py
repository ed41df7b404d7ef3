"""Training and evaluation data: segments, the audiofolder format (SPEC 5) and decoding.

A dataset is a list of :class:`Segment` rows. Two sources make them:

* :func:`load_folder`: an audiofolder-style directory, ``metadata.jsonl`` + ``audio/`` (+
  ``video/``), validated row by row with errors that name the line and the file;
* :func:`load_audio_dataset`: an audio-only Hugging Face dataset with the schema of
  ``pipecat-ai/smart-turn-data-v3.2-train`` (``audio`` + ``endpoint_bool`` [+ ``id``,
  ``language``, ...]), from the Hub, a ``save_to_disk`` directory or local data files. Its audio
  column is read as raw bytes (``Audio(decode=False)``) and decoded by our own front end, so
  ``torchcodec`` is never needed.

Every segment belongs to a GROUP, the recording it was cut from; splits are made by group
(:mod:`smart_turn_mm.mixing`) so that no recording, and no copy of a segment, is on both sides.
The group is the row's ``source`` (or ``recording``) field when present; otherwise the audio
file's stem up to its LAST underscore (``audio/rec07_0003.wav`` -> ``rec07``; a stem without an
underscore is a group of its own). Hub rows without such a field are their own group.

:func:`decode_segment` turns a segment into model inputs with the package's front ends
(:func:`~smart_turn_mm.audio.whisper_features`, :func:`~smart_turn_mm.video.prepare_video` with
``face_crop=False``: dataset clips are face-cropped when the dataset is prepared). This module
needs numpy and PyAV only; the torch ``Dataset`` lives in :mod:`smart_turn_mm.loader`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.locations import atomic_path

__all__ = [
    "METADATA_FIELDS",
    "METADATA_NAME",
    "Batch",
    "Example",
    "HubAudio",
    "Segment",
    "decode_segment",
    "group_of",
    "iter_batches",
    "label_counts",
    "load_audio_dataset",
    "load_folder",
    "write_metadata",
]

METADATA_NAME = "metadata.jsonl"
# The row fields of the training data format (SPEC 5); writers may add more.
METADATA_FIELDS = (
    "file_name",
    "id",
    "language",
    "endpoint_bool",
    "midfiller",
    "endfiller",
    "synthetic",
    "spoken_text",
    "dataset",
    "video_path",
    "visual_label",
)
# Row fields that name the recording a segment was cut from, in order of preference.
GROUP_FIELDS = ("source", "recording")


@dataclass(frozen=True, eq=False)
class HubAudio:
    """The audio of row ``index`` of a Hugging Face dataset (its ``audio`` column, not decoded)."""

    table: Any  # datasets.Dataset holding only the audio column, cast to Audio(decode=False)
    index: int
    name: str

    def read(self) -> bytes | str:
        """The file's bytes (or its local path when the row stores no bytes)."""
        value = self.table[self.index]["audio"]
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            return value["path"]
        raise ValueError(f"{self.name} row {self.index}: the audio column holds no bytes or file")


@dataclass(frozen=True)
class Segment:
    """One labelled turn ending.

    Attributes:
        id: the row's id (unique within its dataset).
        label: True = the turn is complete, False = the speaker goes on, None = unlabelled.
        audio: an audio file path, its bytes, or a :class:`HubAudio` row.
        group: the source recording (splits never separate a group).
        video: a face-cropped video file path, or None.
        dataset: the dataset's name (``dataset`` field, folder name or Hub id).
        language: the row's language code, if given.
        fields: every other metadata field of the row (kept for reports).
    """

    id: str
    label: bool | None
    audio: str | bytes | HubAudio = field(repr=False)
    group: str
    video: str | None = None
    dataset: str = ""
    language: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        """A string that identifies this segment's audio (for caches and leakage checks)."""
        if isinstance(self.audio, str):
            return os.path.abspath(self.audio)
        if isinstance(self.audio, HubAudio):
            return f"{self.audio.name}#{self.audio.index}"
        return f"{self.dataset}#{self.id}"

    @property
    def has_video(self) -> bool:
        return self.video is not None


def group_of(row: dict[str, Any], file_name: str) -> str:
    """The recording a row was cut from: its ``source``/``recording`` field, else the file stem
    up to the last underscore (``audio/rec07_0003.wav`` -> ``rec07``)."""
    for name in GROUP_FIELDS:
        value = row.get(name)
        if value is not None and str(value) != "":
            return str(value)
    stem = Path(file_name).stem
    return stem.rsplit("_", 1)[0] if "_" in stem.strip("_") else stem


# --------------------------------------------------------------------------- audiofolder


def _row_error(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}:{line}: {message}")


def load_folder(root: str | os.PathLike, *, check_files: bool = True) -> list[Segment]:
    """Read an audiofolder-style dataset (SPEC 5): ``root/metadata.jsonl`` and its files.

    Each line is a JSON object with at least ``file_name`` (the audio file, relative to
    ``root``) and ``endpoint_bool`` (true, false or null); ``video_path`` (relative, or null)
    names a face-cropped clip; ``id`` defaults to the file stem. Blank lines are skipped.

    Raises:
        FileNotFoundError: no ``metadata.jsonl`` in ``root``.
        ValueError: a malformed row or a missing file; the message names the line and file.
    """
    root = Path(root)
    meta = root / METADATA_NAME
    if not meta.is_file():
        raise FileNotFoundError(
            f"{root} is not a dataset folder: {METADATA_NAME} not found "
            "(expected metadata.jsonl + audio/ [+ video/], see SPEC 5)"
        )
    segments: list[Segment] = []
    seen: dict[str, int] = {}
    with meta.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _row_error(meta, line_no, f"invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise _row_error(meta, line_no, f"expected a JSON object, got {type(row).__name__}")
            segments.append(_folder_segment(root, meta, line_no, row, seen, check_files))
    if not segments:
        raise ValueError(f"{meta} has no rows")
    return segments


def _folder_segment(
    root: Path,
    meta: Path,
    line_no: int,
    row: dict[str, Any],
    seen: dict[str, int],
    check_files: bool,
) -> Segment:
    file_name = row.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise _row_error(
            meta, line_no, f"'file_name' must be a non-empty string, got {file_name!r}"
        )
    if "endpoint_bool" not in row:
        raise _row_error(meta, line_no, "missing 'endpoint_bool' (true, false or null)")
    label = row["endpoint_bool"]
    if label is not None and not isinstance(label, bool):
        raise _row_error(
            meta, line_no, f"'endpoint_bool' must be true, false or null, got {label!r}"
        )
    audio = root / file_name
    if check_files and not audio.is_file():
        raise _row_error(meta, line_no, f"audio file not found: {audio}")
    video_name = row.get("video_path")
    video: str | None = None
    if video_name is not None:
        if not isinstance(video_name, str) or not video_name:
            raise _row_error(
                meta, line_no, f"'video_path' must be a string or null, got {video_name!r}"
            )
        video_file = root / video_name
        if check_files and not video_file.is_file():
            raise _row_error(meta, line_no, f"video file not found: {video_file}")
        video = str(video_file)
    seg_id = str(row.get("id") or Path(file_name).stem)
    if seg_id in seen:
        raise _row_error(meta, line_no, f"duplicate id {seg_id!r} (first on line {seen[seg_id]})")
    seen[seg_id] = line_no
    known = {"file_name", "id", "endpoint_bool", "video_path", "dataset", "language"}
    return Segment(
        id=seg_id,
        label=label,
        audio=str(audio),
        group=group_of(row, file_name),
        video=video,
        dataset=str(row.get("dataset") or root.name),
        language=row.get("language"),
        fields={k: v for k, v in row.items() if k not in known},
    )


def write_metadata(root: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``root/metadata.jsonl`` (one JSON object per line) atomically; returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / METADATA_NAME
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- Hugging Face


def load_audio_dataset(
    source: str | os.PathLike,
    *,
    split: str = "train",
    max_rows: int | None = None,
) -> list[Segment]:
    """Load an audio-only dataset with the ``pipecat-ai/smart-turn-data-v3.2-train`` schema.

    ``source`` is an audiofolder directory (read by :func:`load_folder`), a directory written
    by ``datasets.save_to_disk``, local data files / a directory that ``datasets.load_dataset``
    reads, or a Hub dataset id (online, or from the local Hub cache). The ``audio`` column is
    kept as bytes and decoded later by :func:`decode_segment`.

    Args:
        source: where the dataset is.
        split: the split to read (Hub and ``DatasetDict`` sources).
        max_rows: keep only the first ``max_rows`` rows.
    """
    path = Path(source)
    if path.is_dir() and (path / METADATA_NAME).is_file():
        rows = load_folder(path)
        return rows[:max_rows] if max_rows is not None else rows
    import datasets

    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ValueError(f"{path} has splits {sorted(table)}, not {split!r}")
            table = table[split]
    else:
        table = datasets.load_dataset(str(source), split=split)
    name = str(source)
    missing = [c for c in ("audio", "endpoint_bool") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {missing}; expected the smart-turn-data-v3 schema "
            f"(audio, endpoint_bool, ...), found {table.column_names}"
        )
    if max_rows is not None:
        table = table.select(range(min(max_rows, len(table))))
    table = table.cast_column("audio", datasets.Audio(decode=False))
    audio_table = table.select_columns(["audio"])
    labels = list(table["endpoint_bool"])
    columns = {
        c: list(table[c])
        for c in ("id", "language", "dataset", *GROUP_FIELDS)
        if c in table.column_names
    }
    segments = []
    for i, label in enumerate(labels):
        if label is not None and not isinstance(label, bool):
            raise ValueError(f"{name} row {i}: endpoint_bool must be a bool or null, got {label!r}")
        seg_id = str(columns["id"][i]) if "id" in columns else f"{i}"
        group = next(
            (str(columns[g][i]) for g in GROUP_FIELDS if g in columns and columns[g][i]),
            f"{name}#{seg_id}",
        )
        segments.append(
            Segment(
                id=seg_id,
                label=label,
                audio=HubAudio(audio_table, i, name),
                group=group,
                dataset=str(columns["dataset"][i]) if "dataset" in columns else name,
                language=columns["language"][i] if "language" in columns else None,
            )
        )
    return segments


def label_counts(segments: Sequence[Segment]) -> dict[str, int]:
    """Counts of complete / incomplete / unlabelled segments and of those with video."""
    return {
        "total": len(segments),
        "complete": sum(s.label is True for s in segments),
        "incomplete": sum(s.label is False for s in segments),
        "unlabelled": sum(s.label is None for s in segments),
        "with_video": sum(s.has_video for s in segments),
    }


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Example:
    """A decoded segment: float32 features (80, 800) and, if it has video, pixels (3, T, S, S)."""

    features: np.ndarray
    pixels: np.ndarray | None


def decode_segment(
    segment: Segment, *, num_frames: int, frame_size: int, with_video: bool = True
) -> Example:
    """Decode a segment with the package's front ends.

    Audio: :func:`~smart_turn_mm.audio.whisper_features` (last 8 s, left-padded). Video:
    :func:`~smart_turn_mm.video.prepare_video` with ``face_crop=False`` (dataset clips are
    already face-cropped), the last ``num_frames`` frames, padded by repeating the last one.

    Raises:
        ValueError: an undecodable file, naming the segment.
    """
    from smart_turn_mm.audio import whisper_features
    from smart_turn_mm.video import prepare_video

    audio = segment.audio.read() if isinstance(segment.audio, HubAudio) else segment.audio
    try:
        features = whisper_features(audio)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"segment {segment.id!r} ({segment.dataset}): audio: {e}") from e
    pixels = None
    if with_video and segment.video is not None:
        try:
            clip = prepare_video(
                segment.video, face_crop=False, num_frames=num_frames, size=frame_size
            )
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"segment {segment.id!r} ({segment.dataset}): video: {e}") from e
        pixels = clip.pixel_values
    return Example(features, pixels)


@dataclass(frozen=True)
class Batch:
    """Decoded segments stacked for a model.

    Attributes:
        segments: the B segments, in order.
        features: float32 (B, 80, 800).
        pixels: float32 (B, 3, T, S, S), zeros where a segment has no video; None when none has.
        video_mask: bool (B,), which segments have video.
        labels: float32 (B,), 1 = complete (unlabelled segments are not allowed here).
    """

    segments: list[Segment]
    features: np.ndarray
    pixels: np.ndarray | None
    video_mask: np.ndarray
    labels: np.ndarray


def stack_examples(segments: Sequence[Segment], examples: Sequence[Example]) -> Batch:
    """Stack decoded examples into a :class:`Batch` (zero pixels where there is no video)."""
    features = np.stack([e.features for e in examples])
    mask = np.array([e.pixels is not None for e in examples], dtype=bool)
    pixels = None
    if mask.any():
        shape = next(e.pixels.shape for e in examples if e.pixels is not None)
        pixels = np.zeros((len(examples), *shape), np.float32)
        for i, e in enumerate(examples):
            if e.pixels is not None:
                pixels[i] = e.pixels
    labels = np.array([float(bool(s.label)) for s in segments], np.float32)
    return Batch(list(segments), features, pixels, mask, labels)


def iter_batches(
    segments: Sequence[Segment],
    *,
    batch_size: int,
    num_frames: int,
    frame_size: int,
    with_video: bool = True,
    threads: int | None = None,
) -> Iterator[Batch]:
    """Decode ``segments`` in order, in batches, with a small thread pool (PyAV and numpy's FFT
    release the GIL). Needs no torch, so ONNX evaluation runs on the inference install."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    threads = threads or min(4, os.cpu_count() or 1)

    def decode(segment: Segment) -> Example:
        return decode_segment(
            segment, num_frames=num_frames, frame_size=frame_size, with_video=with_video
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        chunks = [segments[i : i + batch_size] for i in range(0, len(segments), batch_size)]
        pending = [pool.map(decode, chunk) for chunk in chunks[:2]]
        for i, chunk in enumerate(chunks):
            examples = list(pending[i])
            if i + 2 < len(chunks):
                pending.append(pool.map(decode, chunks[i + 2]))
            yield stack_examples(chunk, examples)
