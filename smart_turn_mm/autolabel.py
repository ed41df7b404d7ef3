"""``smart-turn-mm autolabel``: fill ``endpoint_bool`` of a prepared dataset from a rule.

The rule, per recording (rows grouped by ``source``, as ``prepare`` writes them):

* the recording's LAST segment (``is_last``: the speech before it ends the recording) is
  complete: ``true``;
* every segment cut at a pause INSIDE the recording (more speech follows) is incomplete:
  ``false``;
* the FIRST segment (``segment_index`` 0) stays unlabelled (``null``; ``--first false`` labels
  it incomplete): speakers often pause after a first short phrase in ways that are neither
  clearly a turn end nor clearly a continuation. A recording with one segment labels it by
  the last-segment rule.

Recordings can be excluded (all their segments set to ``null``) by words in their transcript
(``--exclude-words``; the ``transcript`` field, from a ``<video>.txt`` file beside the video)
and by length (``--min-recording-s``, ``--max-recording-s``, ``--min-segments``).

The published data had a confound: every positive ended at the end of its file. ``prepare``
removes it: every segment, positive or negative, ends ``trailing_ms`` (default 200 ms) after
the end of its speech, cut from inside the recording, so both classes end with the same
silence and neither ends at a file boundary. This command checks that on the rows it labels
and reports, per class, the trailing silence and duration (a warning when they differ).

Labels set by hand (``label_source: "manual"``, from the labelling page) are kept unless
``--overwrite-manual``. The rewrite of ``metadata.jsonl`` is atomic and locked
(:mod:`smart_turn_mm.metafile`); every change is appended to ``autolabel.log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import metafile

__all__ = ["LOG_NAME", "AutolabelRules", "AutolabelSummary", "add_arguments", "autolabel", "run"]

METADATA_NAME = "metadata.jsonl"
LOG_NAME = "autolabel.log.jsonl"
# Row fields the rule needs (written by ``prepare``).
_NEEDED = ("source", "segment_index", "is_last")


@dataclass(frozen=True)
class AutolabelRules:
    """The labelling rule's options.

    Attributes:
        first: label of a recording's first segment (``None``: unlabelled).
        exclude_words: recordings whose transcript contains one of these words
            (case-insensitive, whole words or phrases) are unlabelled.
        min_recording_s / max_recording_s: recordings outside this length are unlabelled.
        min_segments: recordings with fewer segments are unlabelled.
        overwrite_manual: also relabel rows whose label was set by hand.
    """

    first: bool | None = None
    exclude_words: tuple[str, ...] = ()
    min_recording_s: float = 0.0
    max_recording_s: float = float("inf")
    min_segments: int = 1
    overwrite_manual: bool = False


@dataclass
class AutolabelSummary:
    """What autolabel did (``class_stats``: per label, trailing silence and duration)."""

    rows: int = 0
    recordings: int = 0
    excluded_recordings: dict[str, str] = field(default_factory=dict)
    changed: int = 0
    kept_manual: int = 0
    not_prepared: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    class_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _exclusion(rows: Sequence[dict[str, Any]], rules: AutolabelRules) -> str | None:
    """Why a recording is excluded, or ``None``."""
    recording_s = rows[0].get("recording_s")
    if isinstance(recording_s, (int, float)):
        if recording_s < rules.min_recording_s:
            return f"recording {recording_s:.1f} s < {rules.min_recording_s:g} s"
        if recording_s > rules.max_recording_s:
            return f"recording {recording_s:.1f} s > {rules.max_recording_s:g} s"
    if len(rows) < rules.min_segments:
        return f"{len(rows)} segment(s) < {rules.min_segments}"
    transcript = next((r["transcript"] for r in rows if r.get("transcript")), None)
    if transcript and rules.exclude_words:
        for word in rules.exclude_words:
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", transcript, re.IGNORECASE):
                return f"transcript contains {word!r}"
    return None


def _rule_label(row: dict[str, Any], rules: AutolabelRules) -> tuple[bool | None, str]:
    if row["is_last"]:
        return True, "last segment of the recording"
    if row["segment_index"] == 0:
        return rules.first, "first segment"
    return False, "pause inside the recording"


def _label_name(value: bool | None) -> str:
    return {True: "complete", False: "incomplete", None: "unlabelled"}[value]


def _class_stats(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for value in (True, False):
        chosen = [r for r in rows if r.get("endpoint_bool") is value]
        if not chosen:
            continue
        trailing = [float(r["trailing_ms"]) for r in chosen if "trailing_ms" in r]
        durations = [float(r["duration_s"]) for r in chosen if "duration_s" in r]
        out[_label_name(value)] = {
            "count": len(chosen),
            "trailing_ms_min": min(trailing, default=float("nan")),
            "trailing_ms_max": max(trailing, default=float("nan")),
            "duration_s_median": statistics.median(durations) if durations else float("nan"),
        }
    return out


def autolabel(
    dataset: str | Path, rules: AutolabelRules | None = None, *, dry_run: bool = False
) -> AutolabelSummary:
    """Apply the rule to ``dataset/metadata.jsonl`` (atomically, under the folder lock).

    Rows not written by ``prepare`` (without ``source``, ``segment_index``, ``is_last``) are
    left as they are and counted in ``not_prepared``.

    Raises:
        FileNotFoundError: no ``metadata.jsonl``.
        ValueError: a malformed metadata line.
    """
    root = Path(dataset)
    meta = root / METADATA_NAME
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: run `smart-turn-mm prepare` first")
    rules = rules or AutolabelRules()
    summary = AutolabelSummary()
    with metafile.locked(root):
        rows = metafile.read_jsonl(meta)
        summary.rows = len(rows)
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if all(name in row for name in _NEEDED):
                by_source[str(row["source"])].append(row)
            else:
                summary.not_prepared += 1
        summary.recordings = len(by_source)
        changes = []
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for source, members in by_source.items():
            members.sort(key=lambda r: r["segment_index"])
            excluded = _exclusion(members, rules)
            if excluded:
                summary.excluded_recordings[source] = excluded
            for row in members:
                if row.get("label_source") == "manual" and not rules.overwrite_manual:
                    summary.kept_manual += 1
                    continue
                if excluded:
                    label, reason = None, f"excluded: {excluded}"
                else:
                    label, reason = _rule_label(row, rules)
                new_source = None if label is None else "autolabel"
                old = row.get("endpoint_bool")
                if old is label and row.get("label_source") == new_source:
                    continue
                changes.append(
                    {
                        "time": stamp,
                        "id": row.get("id"),
                        "source": source,
                        "old": old,
                        "new": label,
                        "old_label_source": row.get("label_source"),
                        "reason": reason,
                    }
                )
                row["endpoint_bool"] = label
                row["label_source"] = new_source
        summary.changed = len(changes)
        if changes and not dry_run:
            metafile.rewrite_jsonl(meta, rows)
            metafile.repair_tail(root / LOG_NAME)
            metafile.append_jsonl(root / LOG_NAME, changes)
    for value in (True, False, None):
        summary.labels[_label_name(value)] = sum(r.get("endpoint_bool") is value for r in rows)
    summary.class_stats = _class_stats(rows)
    summary.warnings = _confound_warnings(summary.class_stats, rows)
    return summary


def _confound_warnings(
    stats: dict[str, dict[str, float]], rows: Sequence[dict[str, Any]]
) -> list[str]:
    warnings = []
    trailing = {r.get("trailing_ms") for r in rows if r.get("endpoint_bool") is not None}
    if len(trailing) > 1:
        warnings.append(
            f"labelled segments have different trailing silences {sorted(map(str, trailing))}: "
            "prepare the whole dataset with one --trailing-ms"
        )
    at_end = [
        r.get("id")
        for r in rows
        if r.get("endpoint_bool") is not None and r.get("after_cut_s") is not None
        if float(r["after_cut_s"]) < 0
    ]
    if at_end:
        warnings.append(f"{len(at_end)} labelled segment(s) end after the recording's end")
    if "complete" in stats and "incomplete" in stats:
        pos = stats["complete"]["duration_s_median"]
        neg = stats["incomplete"]["duration_s_median"]
        if min(pos, neg) > 0 and max(pos, neg) / min(pos, neg) > 2.0:
            warnings.append(
                f"median duration differs between classes ({pos:.2f} s complete vs {neg:.2f} s "
                "incomplete): length alone may predict the label"
            )
    return warnings


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm autolabel``."""
    parser.add_argument("dataset", metavar="DATASET_DIR", help="folder written by prepare")
    parser.add_argument(
        "--first",
        choices=("null", "false"),
        default="null",
        help="label of each recording's first segment (default: null = unlabelled)",
    )
    parser.add_argument(
        "--exclude-words",
        default="",
        help="comma-separated words/phrases: recordings whose transcript contains one are "
        "left unlabelled",
    )
    parser.add_argument("--min-recording-s", type=float, default=0.0)
    parser.add_argument("--max-recording-s", type=float, default=float("inf"))
    parser.add_argument(
        "--min-segments", type=int, default=1, help="recordings with fewer are left unlabelled"
    )
    parser.add_argument(
        "--overwrite-manual", action="store_true", help="also relabel hand-labelled rows"
    )
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``smart-turn-mm autolabel``."""
    rules = AutolabelRules(
        first=None if args.first == "null" else False,
        exclude_words=tuple(w.strip() for w in args.exclude_words.split(",") if w.strip()),
        min_recording_s=args.min_recording_s,
        max_recording_s=args.max_recording_s,
        min_segments=args.min_segments,
        overwrite_manual=args.overwrite_manual,
    )
    summary = autolabel(args.dataset, rules, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(asdict(summary), indent=2, ensure_ascii=False))
        return 0
    verb = "would change" if args.dry_run else "changed"
    labels = ", ".join(f"{v} {k}" for k, v in summary.labels.items())
    print(f"{summary.rows} segments of {summary.recordings} recordings: {labels}")
    print(f"{verb} {summary.changed} label(s); kept {summary.kept_manual} manual label(s)")
    for source, reason in summary.excluded_recordings.items():
        print(f"excluded {source}: {reason}")
    for name, stats in summary.class_stats.items():
        print(
            f"{name}: {stats['count']} segments, trailing silence "
            f"{stats['trailing_ms_min']:g}-{stats['trailing_ms_max']:g} ms, "
            f"median duration {stats['duration_s_median']:.2f} s"
        )
    if summary.not_prepared:
        print(f"left {summary.not_prepared} row(s) without prepare's fields untouched")
    if summary.changed and not args.dry_run:
        print(f"log: {Path(args.dataset) / LOG_NAME}")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
