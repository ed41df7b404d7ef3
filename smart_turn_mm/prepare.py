"""``smart-turn-mm prepare``: a folder of talking-head videos -> a training folder (SPEC 5).

For each video file (found recursively; see :data:`VIDEO_SUFFIXES`):

1. decode its first audio stream to mono float32 at 16 kHz
   (:func:`~smart_turn_mm.audio.load_audio`);
2. find speech with Silero VAD (:func:`smart_turn_mm.vad.speech_segments`, the model shipped in
   its wheel); speech regions separated by less than ``silence_ms`` are one region;
3. cut ONE segment at each pause: the segment ends at the pause's onset (the end of speech)
   plus a fixed ``trailing_ms`` of silence, i.e. where a live detector would be asked: pipecat
   asks its turn model after ``VADParams.stop_secs`` = 0.2 s of silence, hence the default of
   :data:`DEFAULT_TRAILING_MS`. Every segment, the last one of a recording included, ends with
   the same trailing silence and is cut inside the recording, never at its end: a speech
   region whose following silence is shorter than ``trailing_ms`` (speech running into the end
   of the file) gives no segment. The segment starts where a live detector's buffer would:
   at the recording's first speech (minus :data:`LEAD_MS`), but at most ``context_s``
   (default 8 s, the model's audio window) before the cut;
4. crop the face with THE crop of :mod:`smart_turn_mm.face`: one box per segment,
   :func:`~smart_turn_mm.face.clip_face_box` on the segment's last
   :data:`~smart_turn_mm.video.NUM_FRAMES` frames before the cut, exactly the frames (and
   so the box) that a live detector would use; the margin is
   :data:`~smart_turn_mm.face.FACE_MARGIN` (0.25 of the face's larger side on each side).
   That box crops every frame of the segment, resized by
   :func:`~smart_turn_mm.face.crop_frames` to :data:`CLIP_SIZE` = 224 px (twice the model's
   112: training's ``prepare_video(path, face_crop=False)`` takes the whole square and halves
   it with the same scaler, and labellers see a sharper picture);
5. write ``audio/<id>.wav`` (16-bit, 16 kHz mono) and ``video/<id>.mp4`` (H.264 at the
   source frame rate, video only: the labelling page plays the WAV in sync, which saves an
   AAC encode that cost more than the H.264 one), both spanning exactly the segment's time
   range, then append the rows to ``metadata.jsonl``.

Rows carry the SPEC 5 fields (``endpoint_bool`` stays ``null`` until ``autolabel`` or the
labelling page sets it) and how they were made: ``source`` (the recording id: splits group by
it), ``source_path`` (the original name, non-ASCII kept), times, the pause length, the face
box in source pixels, ``face_found`` (training never re-detects). A segment without a face
gets ``video_path: null`` (the model then uses its zero video embedding, SPEC 2) and keeps
its centre-crop clip in ``clip_path`` so it can still be watched and labelled.

Robustness: files are processed in parallel processes; a file's rows are appended with ONE
write after all its media files are in place (each written to a temporary name and renamed),
and the file is then recorded in ``prepared.jsonl``, so a re-run skips it. A run that was
interrupted leaves no half row (see :mod:`smart_turn_mm.metafile`): on start-up, temporary
files and rows of files not recorded as finished are removed. Unreadable files, files without
an audio or video stream or without speech are logged and recorded as skipped; a full disk
stops the run with a clear message and leaves the dataset as it was before the failing file.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metafile
from .audio import SAMPLE_RATE, WINDOW_SECONDS, load_audio
from .face import FACE_MARGIN, FaceBox, FaceDetector, clip_face_box, crop_frames, sws_options
from .media import write_video, write_wav
from .video import FRAME_SIZE, NUM_FRAMES

__all__ = [
    "CLIP_SIZE",
    "DEFAULT_SILENCE_MS",
    "DEFAULT_TRAILING_MS",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "VIDEO_SUFFIXES",
    "FileResult",
    "PrepareOptions",
    "PrepareSummary",
    "add_arguments",
    "discover_videos",
    "plan_segments",
    "prepare_dataset",
    "prepare_file",
    "run",
    "source_id",
]

METADATA_NAME = "metadata.jsonl"
# One row per processed input file (the last row for a file wins): what makes re-runs skip it.
MANIFEST_NAME = "prepared.jsonl"
# Held (non-blocking) for a whole run: two prepare runs on one folder would clean up each
# other's temporary files.
RUN_LOCK_NAME = ".prepare.lock"

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv")
# A pause of at least this long ends a segment.
DEFAULT_SILENCE_MS = 500
# Silence kept after the end of speech in EVERY segment (pipecat's VADParams.stop_secs, 0.2 s,
# after which a live pipeline asks the turn model).
DEFAULT_TRAILING_MS = 200
# Speech shorter than this is ignored by the VAD (clicks, breaths).
DEFAULT_MIN_SPEECH_MS = 250
# Audio kept before the recording's first speech (a live VAD's pre-speech buffer).
LEAD_MS = 200
# Side of the written face clips: twice the model's input, halved by training's resize.
CLIP_SIZE = 2 * FRAME_SIZE
# H.264 settings of the face clips: at CRF 18, libx264's "superfast" preset encodes 2.3x faster
# than "veryfast" with the same fidelity (mean error about 2 grey levels), in twice the bytes.
CLIP_CRF = 18
CLIP_PRESET = "superfast"
# A segment needs video frames up to at least this close to its cut (else: no video).
_VIDEO_GAP_S = 0.25
_SLUG_CHARS = 40


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PrepareOptions:
    """Settings of a prepare run (every one has a ``prepare`` command-line option).

    Attributes:
        silence_ms: a pause of at least this many ms ends a segment.
        trailing_ms: silence kept after the end of speech in every segment (must be <=
            ``silence_ms``).
        context_s: a segment starts at most this many seconds before its cut.
        vad_threshold: Silero speech probability threshold.
        min_speech_ms: shorter speech is ignored.
        language: the ``language`` field of every row (``None``: null).
        dataset: the ``dataset`` field (default: the input folder's name).
        clip_size: side of the written face clips in pixels.
    """

    silence_ms: int = DEFAULT_SILENCE_MS
    trailing_ms: int = DEFAULT_TRAILING_MS
    context_s: float = float(WINDOW_SECONDS)
    vad_threshold: float = 0.5
    min_speech_ms: int = DEFAULT_MIN_SPEECH_MS
    language: str | None = None
    dataset: str = ""
    clip_size: int = CLIP_SIZE

    def __post_init__(self) -> None:
        if self.trailing_ms < 0 or self.silence_ms <= 0:
            raise ValueError(
                f"silence_ms must be > 0 and trailing_ms >= 0, got {self.silence_ms}, "
                f"{self.trailing_ms}"
            )
        if self.trailing_ms > self.silence_ms:
            raise ValueError(
                f"trailing_ms ({self.trailing_ms}) must not exceed silence_ms "
                f"({self.silence_ms}): the trailing silence must fit inside every pause"
            )
        if self.context_s <= 0:
            raise ValueError(f"context_s must be > 0, got {self.context_s}")
        if self.clip_size < 2 or self.clip_size % 2:
            raise ValueError(f"clip_size must be even and >= 2, got {self.clip_size}")


# --------------------------------------------------------------------------- names


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_text).strip("_")
    return slug[:_SLUG_CHARS].strip("_") or "video"


def source_id(relative_path: str) -> str:
    """The ASCII recording id of an input file: a slug of its path + 8 hex of its SHA-1.

    ``relative_path`` is the file's POSIX path relative to the input folder; the hash keeps
    ids unique when slugs collide (``vidéo_会話.mp4`` -> ``video-<hash>``).
    """
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    return f"{_slug(stem)}-{digest}"


def discover_videos(root: str | os.PathLike[str], exclude: Sequence[Path] = ()) -> list[Path]:
    """Video files under ``root`` (recursive, sorted; hidden files and folders skipped).

    ``root`` may also be a single file. Folders in ``exclude`` (e.g. the output folder) are
    not searched.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    excluded = {p.resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES:
                found.append(here / name)
    return found


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class PlannedSegment:
    """Where one segment lies in its recording, in 16 kHz samples.

    ``start`` <= ``speech_end`` < ``cut`` = ``speech_end`` + trailing silence; ``pause``:
    the silence after ``speech_end`` in the recording (to the end of the file for the last).
    """

    index: int
    start: int
    speech_start: int
    speech_end: int
    cut: int
    pause: int
    is_last: bool


def plan_segments(
    speech: Sequence[tuple[int, int]], num_samples: int, options: PrepareOptions
) -> list[PlannedSegment]:
    """Segments from VAD speech regions ``[(start, end), ...]`` (samples, sorted).

    Regions closer than ``silence_ms`` are merged; each merged region gives a segment that
    ends ``trailing_ms`` after the region's end, unless the recording ends sooner.
    """
    min_gap = options.silence_ms * SAMPLE_RATE // 1000
    trailing = options.trailing_ms * SAMPLE_RATE // 1000
    merged: list[list[int]] = []
    for start, end in speech:
        start, end = max(0, int(start)), min(num_samples, int(end))
        if end <= start:
            continue
        if merged and start - merged[-1][1] < min_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return []
    turn_start = max(0, merged[0][0] - LEAD_MS * SAMPLE_RATE // 1000)
    context = round(options.context_s * SAMPLE_RATE)
    planned = []
    for i, (start, end) in enumerate(merged):
        following = merged[i + 1][0] if i + 1 < len(merged) else num_samples
        cut = end + trailing
        if cut > following or cut > num_samples:
            continue  # speech runs into the end of the file: never cut at end of file
        planned.append(
            PlannedSegment(
                index=len(planned),
                start=max(turn_start, cut - context),
                speech_start=start,
                speech_end=end,
                cut=cut,
                pause=following - end,
                is_last=i == len(merged) - 1,
            )
        )
    return planned


# --------------------------------------------------------------------------- video


class _LazyRGB(Sequence):
    """Decoded frames seen as RGB arrays, converted only when indexed (the face detector
    looks at three of them)."""

    def __init__(self, frames: Sequence[Any]) -> None:
        self._frames = list(frames)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if i not in self._cache:
            self._cache[i] = self._frames[i].to_ndarray(format="rgb24", **sws_options())
        return self._cache[i]


@dataclass
class _Probe:
    has_audio: bool
    has_video: bool
    rate: Any  # the video's average frame rate (a Fraction) or None
    width: int
    height: int
    audio_start: float


def _probe(path: Path) -> _Probe:
    from .media import open_media, video_streams

    with open_media(path) as container:
        videos = video_streams(container)
        audios = list(container.streams.audio)
        rate, width, height = None, 0, 0
        if videos:
            rate = videos[0].average_rate or videos[0].guessed_rate or None
            width, height = videos[0].codec_context.width, videos[0].codec_context.height
        audio_start = 0.0
        if audios and audios[0].start_time is not None and audios[0].time_base:
            audio_start = float(audios[0].start_time * audios[0].time_base)
        return _Probe(bool(audios), bool(videos), rate, width, height, audio_start)


def _decoded_frames(path: Path, offset: float) -> Iterator[tuple[float, Any]]:
    """(time in seconds on the audio clock, av.VideoFrame) for every frame, in order."""
    import av

    from .media import open_media, video_streams

    with open_media(path) as container:
        stream = video_streams(container)[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        period = 1.0 / float(rate) if rate else 1.0 / 30.0
        try:
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n * period
                yield t - offset, frame
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode the video stream ({e})") from e


def _face_boxes(
    path: Path, cuts_s: Sequence[float], offset: float, detector: FaceDetector | None
) -> list[tuple[FaceBox, bool] | None]:
    """Per cut (ascending): the clip face box of the last NUM_FRAMES frames shown before it,
    or ``None`` when the video does not reach the cut."""
    boxes: list[tuple[FaceBox, bool] | None] = [None] * len(cuts_s)
    tail: deque[Any] = deque(maxlen=NUM_FRAMES)
    last_t = -1.0
    k = 0
    for t, frame in _decoded_frames(path, offset):
        while k < len(cuts_s) and t >= cuts_s[k]:
            if tail and cuts_s[k] - last_t <= _VIDEO_GAP_S:
                boxes[k] = clip_face_box(_LazyRGB(tail), detector)
            k += 1
        if k == len(cuts_s):
            break
        tail.append(frame)
        last_t = t
    while k < len(cuts_s):  # cuts after the last frame
        if tail and cuts_s[k] - last_t <= _VIDEO_GAP_S:
            boxes[k] = clip_face_box(_LazyRGB(tail), detector)
        k += 1
    return boxes


def _segment_crops(
    path: Path,
    spans_s: Sequence[tuple[float, float]],
    boxes: Sequence[FaceBox | None],
    offset: float,
    size: int,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Decode once; yield ``(segment, T uint8 (size, size, 3) crops)`` as each segment's
    span ``[start, cut)`` is complete (spans sorted by cut; segments without a box: none)."""
    pending = {i for i, box in enumerate(boxes) if box is not None}
    crops: dict[int, list[np.ndarray]] = {i: [] for i in pending}
    order = sorted(pending, key=lambda i: spans_s[i][1])
    for t, frame in _decoded_frames(path, offset):
        while order and t >= spans_s[order[0]][1]:
            i = order.pop(0)
            yield i, crops.pop(i)
        if not order:
            return
        # starts never decrease with the cut (start = max(turn start, cut - context)): the
        # active segments are a prefix of ``order``
        active = []
        for i in order:
            if spans_s[i][0] > t:
                break
            active.append(i)
        if active:
            rgb = frame.to_ndarray(format="rgb24", **sws_options())
            for i in active:
                crops[i].append(crop_frames([rgb], boxes[i], size)[0])
    for i in order:
        if crops[i]:
            yield i, crops[i]


# --------------------------------------------------------------------------- one file


@dataclass
class FileResult:
    """What happened to one input file.

    ``status``: ``"done"`` (rows written, possibly zero), ``"skipped"`` (bad input, will be
    skipped again on re-run) or ``"failed"`` (an error; retried on re-run). ``fatal``: the
    error (a full disk) stops the run.
    """

    source: str
    source_path: str
    status: str
    reason: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    fatal: bool = False


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _transcript(path: Path) -> str | None:
    """The text of a sidecar transcript ``<video stem>.txt``, if there is one."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return None


def prepare_file(
    path: str | os.PathLike[str],
    relative: str,
    out_dir: str | os.PathLike[str],
    options: PrepareOptions,
    *,
    detector: FaceDetector | None = None,
) -> FileResult:
    """Segment, crop and write one video file; the rows are returned, not appended.

    Media files are written atomically under ``out_dir/audio`` and ``out_dir/video``; when
    anything fails, the files already written for this input are removed again.
    """
    path, out_dir = Path(path), Path(out_dir)
    source = source_id(relative)
    result = FileResult(source, relative, "done")
    started = time.perf_counter()
    written: list[Path] = []
    try:
        _prepare_into(path, out_dir, options, detector, result, written)
    except (ValueError, FileNotFoundError) as e:
        result.status, result.reason = "skipped", str(e)
    except Exception as e:
        result.status = "failed"
        result.fatal = _is_disk_full(e)
        result.reason = (
            f"disk full while writing {e.filename or out_dir}: {e.strerror}"
            if result.fatal and isinstance(e, OSError)
            else f"{type(e).__name__}: {e}"
        )
    if result.status != "done":
        result.rows = []
        for done in written:
            done.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    return result


def _prepare_into(
    path: Path,
    out_dir: Path,
    options: PrepareOptions,
    detector: FaceDetector | None,
    result: FileResult,
    written: list[Path],
) -> None:
    from .vad import speech_segments

    probe = _probe(path)
    if not probe.has_audio:
        raise ValueError("no audio stream")
    if not probe.has_video:
        raise ValueError("no video stream")
    audio = load_audio(path)
    if len(audio) == 0:
        raise ValueError("the audio stream is empty")
    speech = speech_segments(
        audio,
        threshold=options.vad_threshold,
        min_silence_ms=options.silence_ms,
        min_speech_ms=options.min_speech_ms,
    )
    planned = plan_segments(speech, len(audio), options)
    if not planned:
        reason = "no speech found" if not speech else "speech runs into the end of the file"
        raise ValueError(reason)

    cuts_s = [p.cut / SAMPLE_RATE for p in planned]
    spans_s = [(p.start / SAMPLE_RATE, p.cut / SAMPLE_RATE) for p in planned]
    boxes = _face_boxes(path, cuts_s, probe.audio_start, detector)
    transcript = _transcript(path)
    rate = probe.rate or 30
    rows = []
    for p, found_box in zip(planned, boxes, strict=True):
        seg_id = f"{result.source}_{p.index:03d}"
        audio_name = f"audio/{seg_id}.wav"
        written.append(out_dir / audio_name)
        write_wav(out_dir / audio_name, audio[p.start : p.cut], SAMPLE_RATE)
        box, face_found = found_box if found_box is not None else (None, False)
        row: dict[str, Any] = {
            "file_name": audio_name,
            "id": seg_id,
            "language": options.language,
            "endpoint_bool": None,
            "midfiller": None,
            "endfiller": None,
            "synthetic": False,
            "spoken_text": None,
            "dataset": options.dataset,
            "video_path": None,
            "visual_label": None,
            "source": result.source,
            "source_path": result.source_path,
            "segment_index": p.index,
            "num_segments": len(planned),
            "is_last": p.is_last,
            "start_s": round(p.start / SAMPLE_RATE, 4),
            "speech_start_s": round(p.speech_start / SAMPLE_RATE, 4),
            "speech_end_s": round(p.speech_end / SAMPLE_RATE, 4),
            "end_s": round(p.cut / SAMPLE_RATE, 4),
            "duration_s": round((p.cut - p.start) / SAMPLE_RATE, 4),
            "trailing_ms": options.trailing_ms,
            "pause_ms": round(1000 * p.pause / SAMPLE_RATE),
            "after_cut_s": round((len(audio) - p.cut) / SAMPLE_RATE, 4),
            "recording_s": round(len(audio) / SAMPLE_RATE, 4),
            "clip_path": None,
            "face_found": bool(face_found),
            "face_box": None if box is None else [box.x0, box.y0, box.x1, box.y1],
            "face_score": None if box is None else round(box.score, 4),
            "face_margin": FACE_MARGIN,
            "fps": round(float(rate), 4),
            "source_size": [probe.width, probe.height],
            "transcript": transcript,
            "visual_tags": [],
            "label_source": None,
        }
        rows.append(row)

    usable = [None if b is None else b[0] for b in boxes]
    for i, crops in _segment_crops(path, spans_s, usable, probe.audio_start, options.clip_size):
        p, row = planned[i], rows[i]
        clip_name = f"video/{row['id']}.mp4"
        written.append(out_dir / clip_name)
        write_video(out_dir / clip_name, crops, rate, crf=CLIP_CRF, preset=CLIP_PRESET)
        row["clip_path"] = clip_name
        if row["face_found"]:
            row["video_path"] = clip_name
    result.rows = rows


# --------------------------------------------------------------------------- a whole folder


@dataclass
class PrepareSummary:
    """Counts of a prepare run (``files_per_s`` over the files processed in this run)."""

    found: int = 0
    already_done: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    segments: int = 0
    seconds: float = 0.0
    files_per_s: float = 0.0
    stopped: str = ""
    problems: list[dict[str, str]] = field(default_factory=list)


def _file_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recover(out_dir: Path, keep_sources: set[str], redo_sources: set[str]) -> int:
    """Start-up clean-up under the lock: cut interrupted appends, drop rows of sources not
    recorded as done (and of sources about to be redone); returns the rows dropped."""
    meta = out_dir / METADATA_NAME
    metafile.repair_tail(meta)
    metafile.repair_tail(out_dir / MANIFEST_NAME)
    rows = metafile.read_jsonl(meta)
    kept = [r for r in rows if r.get("source") in keep_sources - redo_sources]
    if len(kept) != len(rows):
        metafile.rewrite_jsonl(meta, kept)
    for folder in ("audio", "video"):  # temporary files of an interrupted run
        for tmp in (out_dir / folder).glob(".*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
    return len(rows) - len(kept)


def _manifest_state(out_dir: Path) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for row in metafile.read_jsonl(out_dir / MANIFEST_NAME):
        if isinstance(row.get("source"), str):
            state[row["source"]] = row
    return state


def _record(out_dir: Path, result: FileResult, key: dict[str, int]) -> FileResult:
    """Append a finished file's rows, then its manifest row, under the folder lock.

    Returns ``result``, or a fatal failure when the disk is full: if the rows could not be
    appended, the file's media files are removed; if only the manifest row could not, the
    rows stay and the next run's start-up drops them and redoes the file.
    """
    entry = {
        "source": result.source,
        "source_path": result.source_path,
        **key,
        "status": result.status,
        "reason": result.reason,
        "segments": len(result.rows),
        "seconds": round(result.seconds, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with metafile.locked(out_dir):
        try:
            metafile.append_jsonl(out_dir / METADATA_NAME, result.rows)
        except OSError as e:
            if not _is_disk_full(e):
                raise
            for row in result.rows:
                for name in ("file_name", "clip_path"):
                    if row.get(name):
                        (out_dir / row[name]).unlink(missing_ok=True)
            return _disk_full(result, f"disk full while appending to {METADATA_NAME}: {e}")
        try:
            metafile.append_jsonl(out_dir / MANIFEST_NAME, [entry])
        except OSError as e:
            if not _is_disk_full(e):
                raise
            return _disk_full(result, f"disk full while appending to {MANIFEST_NAME}: {e}")
    return result


def _disk_full(result: FileResult, reason: str) -> FileResult:
    return FileResult(result.source, result.source_path, "failed", reason, fatal=True)


def _worker(args: tuple[str, str, str, PrepareOptions]) -> FileResult:
    path, relative, out_dir, options = args
    return prepare_file(path, relative, out_dir, options)


def _log_line(line: str) -> None:
    """Print to standard error without breaking a progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=sys.stderr)
        return
    tqdm.write(line, file=sys.stderr)


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, unit="file", desc="prepare", disable=not enabled or None)


def prepare_dataset(
    videos: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: PrepareOptions | None = None,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrepareSummary:
    """Prepare every video under ``videos`` into ``out_dir`` (see the module docstring).

    Args:
        videos: a folder (searched recursively) or one video file.
        out_dir: the dataset folder (created; may already hold a previous run's output).
        options: segmentation and output settings.
        workers: processes (default: CPU count; 1 runs in this process).
        force: redo files already prepared (labels of unchanged segments are kept).
        progress: show a progress bar (on a terminal).
        log: receives one line per skipped or failed file (default: standard error).

    Raises:
        BlockingIOError: another prepare run holds ``out_dir``.
    """
    videos, out_dir = Path(videos), Path(out_dir)
    options = options or PrepareOptions()
    if not options.dataset:
        options = PrepareOptions(**{**asdict(options), "dataset": _slug(videos.resolve().stem)})
    log = log or _log_line
    files = discover_videos(videos, exclude=[out_dir])
    base = videos if videos.is_dir() else videos.parent
    summary = PrepareSummary(found=len(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in ("audio", "video"):
        (out_dir / folder).mkdir(exist_ok=True)
    try:
        run_lock = metafile.locked(out_dir, name=RUN_LOCK_NAME, blocking=False)
        run_lock.__enter__()
    except BlockingIOError as e:
        raise BlockingIOError(f"another prepare run is writing to {out_dir}") from e
    try:
        _prepare_locked(files, base, out_dir, options, workers, force, progress, log, summary)
    finally:
        run_lock.__exit__(None, None, None)
    return summary


def _prepare_locked(
    files: list[Path],
    base: Path,
    out_dir: Path,
    options: PrepareOptions,
    workers: int | None,
    force: bool,
    progress: bool,
    log: Callable[[str], None],
    summary: PrepareSummary,
) -> None:
    jobs = []
    keys: dict[str, dict[str, int]] = {}
    with metafile.locked(out_dir):
        state = _manifest_state(out_dir)
        done_sources = {s for s, e in state.items() if e.get("status") == "done"}
        redo: set[str] = set()
        for path in files:
            relative = path.relative_to(base).as_posix()
            source = source_id(relative)
            key = _file_key(path)
            keys[source] = key
            entry = state.get(source)
            finished = entry is not None and entry.get("status") in ("done", "skipped")
            same = entry is not None and all(entry.get(k) == v for k, v in key.items())
            if finished and same and not force:
                summary.already_done += 1
                continue
            if source in done_sources:
                redo.add(source)
            jobs.append((str(path), relative, str(out_dir), options))
        old_rows = {
            r["id"]: r
            for r in metafile.read_jsonl(out_dir / METADATA_NAME)
            if r.get("source") in redo and "id" in r
        }
        _recover(out_dir, done_sources, redo)

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = _progress(len(jobs), progress)
    started = time.perf_counter()

    def finish(result: FileResult) -> None:
        _carry_labels(result.rows, old_rows)
        result = _record(out_dir, result, keys[result.source])
        if result.status == "done":
            summary.done += 1
            summary.segments += len(result.rows)
        else:
            setattr(summary, result.status, getattr(summary, result.status) + 1)
            summary.problems.append(
                {"file": result.source_path, "status": result.status, "reason": result.reason}
            )
            log(f"{result.status}: {result.source_path}: {result.reason}")
        if result.fatal:
            summary.stopped = (
                f"{result.reason}; the dataset holds every file finished before it: free "
                "some space and run prepare again to continue"
            )
        if bar is not None:
            bar.update(1)

    try:
        if workers == 1:
            for job in jobs:
                finish(_worker(job))
                if summary.stopped:
                    break
        else:
            _run_pool(jobs, workers, finish, summary)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - started
    processed = summary.done + summary.skipped + summary.failed
    summary.files_per_s = processed / summary.seconds if summary.seconds > 0 else 0.0


def _run_pool(
    jobs: list[tuple[str, str, str, PrepareOptions]],
    workers: int,
    finish: Callable[[FileResult], None],
    summary: PrepareSummary,
) -> None:
    """Run jobs on a process pool, at most ``2 * workers`` queued, stopping on a fatal error."""
    queue = iter(jobs)
    running: set[Future[FileResult]] = set()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            for job in queue:
                running.add(pool.submit(_worker, job))
                if len(running) >= 2 * workers:
                    break
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(future.result())
                if not summary.stopped:
                    for job in queue:
                        running.add(pool.submit(_worker, job))
                        if len(running) >= 2 * workers:
                            break
        except BaseException:
            for future in running:
                future.cancel()
            raise


_LABEL_FIELDS = ("endpoint_bool", "visual_label", "visual_tags", "label_source")


def _carry_labels(rows: list[dict[str, Any]], old_rows: dict[str, dict[str, Any]]) -> None:
    """Keep the labels of re-prepared segments that did not move (same id, start and end)."""
    for row in rows:
        old = old_rows.get(row["id"])
        if old is None:
            continue
        if (old.get("start_s"), old.get("end_s")) == (row["start_s"], row["end_s"]):
            for name in _LABEL_FIELDS:
                if name in old:
                    row[name] = old[name]


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm prepare``."""
    parser.add_argument("videos", metavar="VIDEOS_DIR", help="folder of videos (or one file)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to write")
    parser.add_argument(
        "--silence-ms",
        type=int,
        default=DEFAULT_SILENCE_MS,
        help="a pause at least this long ends a segment (default %(default)s)",
    )
    parser.add_argument(
        "--trailing-ms",
        type=int,
        default=DEFAULT_TRAILING_MS,
        help="silence kept after the speech in EVERY segment: where a live detector is asked "
        "(pipecat's VAD stop_secs; default %(default)s)",
    )
    parser.add_argument(
        "--context-s",
        type=float,
        default=float(WINDOW_SECONDS),
        help="a segment starts at most this many seconds before its end (default %(default)s)",
    )
    parser.add_argument("--vad-threshold", type=float, default=0.5, help="Silero threshold")
    parser.add_argument(
        "--min-speech-ms", type=int, default=DEFAULT_MIN_SPEECH_MS, help="ignore shorter speech"
    )
    parser.add_argument("--language", default=None, help="language code stored in every row")
    parser.add_argument("--dataset", default="", help="dataset name (default: folder name)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
    parser.add_argument("--force", action="store_true", help="redo files already prepared")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``smart-turn-mm prepare``; exit status 1 when the run stopped (a full disk)."""
    options = PrepareOptions(
        silence_ms=args.silence_ms,
        trailing_ms=args.trailing_ms,
        context_s=args.context_s,
        vad_threshold=args.vad_threshold,
        min_speech_ms=args.min_speech_ms,
        language=args.language,
        dataset=args.dataset,
    )
    try:
        summary = prepare_dataset(
            args.videos,
            args.out_dir,
            options,
            workers=args.workers,
            force=args.force,
            progress=not args.quiet,
        )
    except BlockingIOError as e:
        print(f"smart-turn-mm prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "smart-turn-mm prepare: interrupted; every finished file is recorded, run the "
            "same command again to continue",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    else:
        print(
            f"{summary.found} video files: {summary.done} prepared, {summary.already_done} "
            f"already done, {summary.skipped} skipped, {summary.failed} failed; "
            f"{summary.segments} segments in {summary.seconds:.1f} s "
            f"({summary.files_per_s:.2f} files/s) -> {Path(args.out_dir) / METADATA_NAME}"
        )
    if summary.stopped:
        print(f"smart-turn-mm prepare: stopped: {summary.stopped}", file=sys.stderr)
        return 1
    return 0
