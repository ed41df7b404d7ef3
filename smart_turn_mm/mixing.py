"""Held-out splits and the training mix (SPEC 6, SPEC 7.1).

The order matters, and is the point of this module:

1. drop unlabelled segments (``endpoint_bool`` null);
2. split each source into train / held-out BY GROUP (source recording), BEFORE any copying,
   so no recording and no copy of a segment is on both sides (:func:`split_by_group`);
3. only then build the training mix (:func:`mix_training_set`): up-sample the minority class of
   the video set to balance it, repeat the video set to ``video_share`` x the audio-only set's
   size, shuffle everything together.

:func:`check_disjoint` verifies step 2's promise and is called before every training run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smart_turn_mm.dataset import Segment

__all__ = [
    "Mix",
    "balance_classes",
    "check_disjoint",
    "drop_unlabelled",
    "mix_training_set",
    "split_by_group",
]


def drop_unlabelled(segments: Sequence[Segment]) -> list[Segment]:
    """The segments whose label is not null."""
    return [s for s in segments if s.label is not None]


def split_by_group(
    segments: Sequence[Segment], fraction: float, *, seed: int = 0
) -> tuple[list[Segment], list[Segment]]:
    """Split into (kept, held_out) with whole groups on one side.

    Groups are shuffled with ``seed`` and moved to the held-out side until it holds at least
    ``fraction`` of the segments (so it can hold a little more). With one group only, or
    ``fraction == 0``, everything is kept. The original order is preserved on each side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not segments:
        return list(segments), []
    sizes: dict[str, int] = {}
    for s in segments:
        sizes[s.group] = sizes.get(s.group, 0) + 1
    if len(sizes) < 2:
        return list(segments), []
    groups = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(groups))
    target = fraction * len(segments)
    held: set[str] = set()
    count = 0
    for i in order:
        if count >= target or len(held) == len(groups) - 1:
            break
        held.add(groups[i])
        count += sizes[groups[i]]
    kept = [s for s in segments if s.group not in held]
    return kept, [s for s in segments if s.group in held]


def check_disjoint(train: Sequence[Segment], held_out: Sequence[Segment], name: str = "") -> None:
    """Raise ValueError if a recording (group) or a segment's audio is on both sides."""
    side = f" and {name}" if name else ""
    groups = {s.group for s in train} & {s.group for s in held_out}
    if groups:
        raise ValueError(
            f"leakage: {len(groups)} recording(s) are in both train{side}, e.g. "
            f"{sorted(groups)[:5]}"
        )
    keys = {s.key for s in train} & {s.key for s in held_out}
    if keys:
        raise ValueError(
            f"leakage: {len(keys)} segment(s) are in both train{side}, e.g. {sorted(keys)[:3]}"
        )


def balance_classes(segments: Sequence[Segment], *, seed: int = 0) -> list[Segment]:
    """Up-sample the minority class (whole copies, then a seeded random remainder) until both
    classes are the same size. One class only, or already balanced: unchanged."""
    pos = [s for s in segments if s.label]
    neg = [s for s in segments if s.label is False]
    if not pos or not neg or len(pos) == len(neg):
        return list(segments)
    minority, majority = (pos, neg) if len(pos) < len(neg) else (neg, pos)
    extra = _tile(minority, len(majority) - len(minority), np.random.default_rng(seed))
    return [*segments, *extra]


def _tile(items: Sequence[Segment], count: int, rng: np.random.Generator) -> list[Segment]:
    """``count`` items drawn from ``items``: whole passes, then a random subset for the rest."""
    whole, rest = divmod(count, len(items))
    out = list(items) * whole
    out += [items[i] for i in sorted(rng.choice(len(items), size=rest, replace=False))]
    return out


@dataclass(frozen=True)
class Mix:
    """The shuffled training mix and how it was made (counts for the run log)."""

    segments: list[Segment]
    audio_only: int
    video_unique: int
    video_balanced: int
    video_total: int

    def summary(self) -> dict[str, int]:
        return {
            "train_total": len(self.segments),
            "train_audio_only": self.audio_only,
            "train_video_unique": self.video_unique,
            "train_video_balanced": self.video_balanced,
            "train_video_total": self.video_total,
        }


def mix_training_set(
    audio_only: Sequence[Segment],
    video: Sequence[Segment],
    *,
    video_share: float = 0.1,
    balance: bool = True,
    seed: int = 0,
) -> Mix:
    """The published training mix, built from TRAIN-side segments only.

    Unlabelled segments are dropped; the video set's minority class is up-sampled
    (``balance``); the video set is then repeated (whole copies plus a random remainder) to
    ``video_share`` x ``len(audio_only)`` segments when that is more than it has (never cut
    down); everything is shuffled together with ``seed``.
    """
    if video_share < 0:
        raise ValueError(f"video_share must be >= 0, got {video_share}")
    rng = np.random.default_rng(seed)
    audio_only = drop_unlabelled(audio_only)
    video_unique = drop_unlabelled(video)
    video_bal = balance_classes(video_unique, seed=seed) if balance else list(video_unique)
    video_all = list(video_bal)
    target = round(video_share * len(audio_only))
    if video_bal and target > len(video_bal):
        video_all += _tile(video_bal, target - len(video_bal), rng)
    mixed = [*audio_only, *video_all]
    order = rng.permutation(len(mixed))
    return Mix(
        segments=[mixed[i] for i in order],
        audio_only=len(audio_only),
        video_unique=len(video_unique),
        video_balanced=len(video_bal),
        video_total=len(video_all),
    )
