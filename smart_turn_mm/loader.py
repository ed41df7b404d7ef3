"""Feeding segments to torch: the Dataset, a resumable sampler, augmentation and the DataLoader.

* :class:`SegmentDataset` decodes a segment with the package's front ends
  (:func:`~smart_turn_mm.dataset.decode_segment`: only the clip's last ``num_frames`` frames
  are decoded) and optionally keeps the result in memory (small datasets);
* :class:`EpochSampler` gives every epoch a fixed shuffled order (from the seed and the epoch),
  shards it across DDP ranks and can start mid-epoch, so a resumed run sees exactly the batches
  it would have seen;
* :func:`color_jitter` is the optional video augmentation (SPEC 6), the same factors for every
  frame of a clip, drawn from a generator seeded by (seed, epoch, index): reproducible whatever
  the number of workers;
* :func:`make_loader` adds workers, pinned memory and prefetching; :func:`measure_throughput`
  reports samples/s.

Items are dicts; :func:`collate` stacks them and builds ``pixel_values`` only when a batch has
video (rows without video are zeros that the model never feeds to the backbone: ``video_mask``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from smart_turn_mm.dataset import Example, Segment, decode_segment
from smart_turn_mm.video import KINETICS_MEAN, KINETICS_STD

__all__ = [
    "ColorJitter",
    "EpochSampler",
    "SegmentDataset",
    "collate",
    "color_jitter",
    "make_loader",
    "measure_throughput",
]

_MEAN = np.asarray(KINETICS_MEAN, np.float32).reshape(3, 1, 1, 1)
_STD = np.asarray(KINETICS_STD, np.float32).reshape(3, 1, 1, 1)
# ITU-R 601 luma weights (torchvision's grayscale).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1, 1)


@dataclass(frozen=True)
class ColorJitter:
    """Colour jitter strengths (SPEC 6 defaults): factors are drawn from [1 - s, 1 + s]."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, jitter: ColorJitter) -> np.ndarray:
    """Apply one random brightness, contrast and saturation change to a whole clip.

    Args:
        pixels: float32 (3, T, H, W), Kinetics-normalised (as the front end makes them).
        rng: draws the three factors.
        jitter: their ranges.

    Returns:
        a new float32 (3, T, H, W) array, normalised again. Every frame gets the same factors;
        the contrast pivot is the clip's mean grey level.
    """
    b = rng.uniform(1 - jitter.brightness, 1 + jitter.brightness)
    c = rng.uniform(1 - jitter.contrast, 1 + jitter.contrast)
    s = rng.uniform(1 - jitter.saturation, 1 + jitter.saturation)
    x = pixels * _STD + _MEAN  # back to [0, 1]
    x = np.clip(x * b, 0.0, 1.0)
    gray = (x * _LUMA).sum(axis=0, keepdims=True)
    x = np.clip((x - gray.mean()) * c + gray.mean(), 0.0, 1.0)
    gray = (x * _LUMA).sum(axis=0, keepdims=True)
    x = np.clip(gray + (x - gray) * s, 0.0, 1.0)
    return ((x - _MEAN) / _STD).astype(np.float32)


class SegmentDataset(Dataset):
    """Decoded segments for training: ``dataset[i]`` or ``dataset[(i, epoch)]`` -> a dict with
    ``input_features`` (80, 800), ``pixel_values`` (3, T, S, S) or None, ``label`` and ``index``.

    Args:
        segments: labelled segments (unlabelled ones are rejected).
        num_frames, frame_size: the model's video input size (T, S).
        with_video: decode video (False for audio-only models).
        jitter: colour-jitter ranges, or None for no augmentation.
        seed: seeds the augmentation, together with the epoch and index.
        cache: keep decoded inputs in memory (for small datasets; per worker process).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        *,
        num_frames: int,
        frame_size: int,
        with_video: bool = True,
        jitter: ColorJitter | None = None,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        unlabelled = [s.id for s in segments if s.label is None]
        if unlabelled:
            raise ValueError(f"{len(unlabelled)} unlabelled segments, e.g. {unlabelled[:3]}")
        self.segments = list(segments)
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.with_video = with_video
        self.jitter = jitter
        self.seed = seed
        self._cache: dict[int, Example] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.segments)

    def decode(self, index: int) -> Example:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        example = decode_segment(
            self.segments[index],
            num_frames=self.num_frames,
            frame_size=self.frame_size,
            with_video=self.with_video,
        )
        if self._cache is not None:
            self._cache[index] = example
        return example

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        example = self.decode(index)
        pixels = example.pixels
        if pixels is not None and self.jitter is not None:
            pixels = color_jitter(
                pixels, np.random.default_rng([self.seed, epoch, index]), self.jitter
            )
        return {
            "input_features": torch.from_numpy(example.features),
            "pixel_values": None if pixels is None else torch.from_numpy(pixels),
            "label": float(bool(self.segments[index].label)),
            "index": index,
        }


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items: ``input_features`` (B, 80, 800), ``pixel_values`` (B, 3, T, S, S) or None
    when no item has video, ``video_mask`` (B,) bool, ``labels`` (B,) float, ``indices`` (B,)."""
    mask = torch.tensor([item["pixel_values"] is not None for item in items], dtype=torch.bool)
    pixels = None
    if bool(mask.any()):
        shape = next(
            item["pixel_values"].shape for item in items if item["pixel_values"] is not None
        )
        pixels = torch.zeros((len(items), *shape), dtype=torch.float32)
        for i, item in enumerate(items):
            if item["pixel_values"] is not None:
                pixels[i] = item["pixel_values"]
    return {
        "input_features": torch.stack([item["input_features"] for item in items]),
        "pixel_values": pixels,
        "video_mask": mask,
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.float32),
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class EpochSampler(Sampler):
    """A shuffled order per (seed, epoch), split across ranks, that can start mid-epoch.

    Every rank gets ``ceil(n / world_size)`` indices (the permutation wraps around to fill the
    last ranks, as ``DistributedSampler`` does). Yields ``(index, epoch)`` for
    :class:`SegmentDataset`, which seeds augmentation with them.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order and skip its first ``start`` indices on this rank."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        """This rank's full index order for ``epoch``."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            perm = np.arange(self.num_samples)
        total = self.per_rank * self.world_size
        perm = np.resize(perm, total)  # wraps around
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order(self.epoch)[self.start :]:
            yield int(index), self.epoch

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def make_loader(
    dataset: SegmentDataset,
    sampler: Sampler,
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader for training: persistent workers with prefetching, pinned memory on CUDA,
    and its own seeded generator (so creating it never touches the global torch RNG). Set the
    sampler's epoch before each ``iter(loader)``."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"prefetch_factor": 4, "persistent_workers": True}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **extra,
    )


def measure_throughput(loader: DataLoader, *, max_batches: int = 20) -> float:
    """Samples/s the loader delivers on its own (decoding only, no model)."""
    count, start = 0, None
    for i, batch in enumerate(loader):
        if i == 0:  # the first batch includes worker start-up
            start = time.perf_counter()
            continue
        count += len(batch["labels"])
        if i >= max_batches:
            break
    if start is None or count == 0:
        return math.nan
    return count / (time.perf_counter() - start)
