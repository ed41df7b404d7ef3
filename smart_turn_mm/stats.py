"""``smart-turn-mm stats``: what a prepared dataset holds.

Counts by label (complete / incomplete / unlabelled), by dataset and by source recording,
segment durations (total, per label), the face-found rate, the trailing silence and the
pause after the cut per label (to check that the classes end alike), and a PNG histogram of
segment durations per label (matplotlib, Agg back end: no display needed).

Reads ``metadata.jsonl`` under the folder lock, so it never sees a half-written file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import metafile

__all__ = ["add_arguments", "dataset_stats", "plot_histogram", "run"]

METADATA_NAME = "metadata.jsonl"
PNG_NAME = "stats.png"
_LABELS = ((True, "complete"), (False, "incomplete"), (None, "unlabelled"))


def _numbers(rows: Sequence[dict[str, Any]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if isinstance(r.get(name), (int, float))]


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "count": len(values),
        "total": round(sum(values), 3),
        "mean": round(statistics.fmean(values), 3),
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _source(row: dict[str, Any]) -> str:
    return str(row.get("source") or row.get("file_name", "?"))


def dataset_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of metadata rows (see the module docstring); JSON-serialisable."""
    by_label: dict[str, Any] = {}
    for value, name in _LABELS:
        chosen = [r for r in rows if r.get("endpoint_bool") is value]
        faces = [r.get("face_found") for r in chosen if "face_found" in r]
        by_label[name] = {
            "count": len(chosen),
            "with_video": sum(r.get("video_path") is not None for r in chosen),
            "face_found_rate": round(sum(map(bool, faces)) / len(faces), 4) if faces else None,
            "duration_s": _summary(_numbers(chosen, "duration_s")),
            "trailing_ms": _summary(_numbers(chosen, "trailing_ms")),
            "pause_ms": _summary(_numbers(chosen, "pause_ms")),
        }
    faces = [bool(r["face_found"]) for r in rows if "face_found" in r]
    sources = Counter(_source(r) for r in rows)
    by_source: dict[str, Counter[str]] = {s: Counter() for s in sources}
    names = dict(_LABELS)
    for r in rows:
        value = r.get("endpoint_bool")
        by_source[_source(r)][names.get(value, "unlabelled")] += 1
    return {
        "segments": len(rows),
        "recordings": len(sources),
        "total_hours": round(sum(_numbers(rows, "duration_s")) / 3600.0, 4),
        "face_found_rate": round(sum(faces) / len(faces), 4) if faces else None,
        "with_video": sum(r.get("video_path") is not None for r in rows),
        "by_label": by_label,
        "by_dataset": dict(Counter(str(r.get("dataset") or "?") for r in rows).most_common()),
        "by_label_source": dict(
            Counter(str(r.get("label_source") or "none") for r in rows).most_common()
        ),
        "segments_per_recording": _summary([float(n) for n in sources.values()]),
        "by_source": {source: dict(by_source[source]) for source in sorted(by_source)},
    }


def plot_histogram(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Save a histogram of segment durations, stacked by label, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    durations = _numbers(rows, "duration_s")
    top = max(durations, default=1.0)
    bins = np.linspace(0.0, max(top, 1e-3) * 1.0001, 25)
    colours = {"complete": "#1a7f37", "incomplete": "#b35900", "unlabelled": "#999999"}
    series = [
        _numbers([r for r in rows if r.get("endpoint_bool") is value], "duration_s")
        for value, _ in _LABELS
    ]
    names = [name for _, name in _LABELS]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(
        series,
        bins=bins,
        stacked=True,
        color=[colours[n] for n in names],
        label=[f"{n} ({len(s)})" for n, s in zip(names, series, strict=True)],
    )
    ax.set_xlabel("segment duration (s)")
    ax.set_ylabel("segments")
    ax.set_title(title or "segment durations by label")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _load(root: Path) -> list[dict[str, Any]]:
    meta = root / METADATA_NAME
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: run `smart-turn-mm prepare` first")
    with metafile.locked(root):
        return metafile.read_jsonl(meta)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm stats``."""
    parser.add_argument("dataset", metavar="DATASET_DIR", help="folder with metadata.jsonl")
    parser.add_argument(
        "--png", default=None, help=f"histogram file (default: DATASET_DIR/{PNG_NAME})"
    )
    parser.add_argument("--no-png", action="store_true", help="do not draw the histogram")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``smart-turn-mm stats``."""
    root = Path(args.dataset)
    rows = _load(root)
    stats = dataset_stats(rows)
    if not args.no_png:
        stats["png"] = str(plot_histogram(rows, args.png or root / PNG_NAME, title=root.name))
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0
    face = stats["face_found_rate"]
    print(
        f"{stats['segments']} segments from {stats['recordings']} recordings, "
        f"{stats['total_hours'] * 60:.1f} min, face found in "
        f"{'-' if face is None else f'{100 * face:.1f}%'}, {stats['with_video']} with video"
    )
    for name, entry in stats["by_label"].items():
        line = f"  {name:<11} {entry['count']:>6}"
        if entry["duration_s"]:
            d = entry["duration_s"]
            line += (
                f"  duration median {d['median']:.2f} s (min {d['min']:.2f}, max {d['max']:.2f})"
            )
        if entry["trailing_ms"]:
            t = entry["trailing_ms"]
            line += f"  trailing {t['min']:g}-{t['max']:g} ms"
        print(line)
    print("  by dataset: " + ", ".join(f"{k} {v}" for k, v in stats["by_dataset"].items()))
    print("  labels set by: " + ", ".join(f"{k} {v}" for k, v in stats["by_label_source"].items()))
    if "png" in stats:
        print(f"histogram: {stats['png']}")
    return 0
