"""Dataset loading and validation, the grouped split, the training mix (no leakage), the
resumable sampler and the torch Dataset."""

from __future__ import annotations

import io
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from smart_turn_mm.dataset import (
    HubAudio,
    Segment,
    decode_segment,
    group_of,
    iter_batches,
    label_counts,
    load_audio_dataset,
    load_folder,
)
from smart_turn_mm.mixing import (
    balance_classes,
    check_disjoint,
    drop_unlabelled,
    mix_training_set,
    split_by_group,
)


@pytest.fixture()
def folder(small_dataset: Path) -> Path:
    return small_dataset


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _seg(i: int, group: str, label: bool | None = True, video: bool = False) -> Segment:
    return Segment(
        id=f"s{i}",
        label=label,
        audio=f"/x/{group}_{i}.wav",
        group=group,
        video=f"/x/{group}_{i}.mp4" if video else None,
    )


# --------------------------------------------------------------------------- folder format


def test_load_folder_reads_rows_groups_and_files(folder: Path) -> None:
    segments = load_folder(folder)
    assert len(segments) == 18
    assert {s.group for s in segments} == {f"rec{i:03d}" for i in range(6)}
    first = segments[0]
    assert Path(first.audio).is_file() and first.audio.endswith(".wav")
    assert first.dataset == "synthetic-av" and first.language == "en"
    assert first.fields["cue"] in ("audio", "video", "both")
    with_video = [s for s in segments if s.video]
    assert with_video and all(Path(s.video).is_file() for s in with_video)
    counts = label_counts(segments)
    assert counts["total"] == 18 and counts["complete"] + counts["incomplete"] == 18


def test_group_of_prefers_source_then_file_prefix() -> None:
    assert group_of({"source": "talk-7"}, "audio/x_01.wav") == "talk-7"
    assert group_of({"recording": 12}, "audio/x_01.wav") == "12"
    assert group_of({}, "audio/rec07_0003.wav") == "rec07"
    assert group_of({}, "audio/a_b_c.wav") == "a_b"
    assert group_of({}, "audio/single.wav") == "single"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows.__setitem__(1, "not json"), ":2: invalid JSON"),
        (lambda rows: rows[2].pop("endpoint_bool"), ":3: missing 'endpoint_bool'"),
        (lambda rows: rows[0].update(endpoint_bool="yes"), ":1: 'endpoint_bool' must be"),
        (lambda rows: rows[3].update(file_name="audio/nope.wav"), ":4: audio file not found"),
        (lambda rows: rows[4].update(video_path="video/nope.mp4"), ":5: video file not found"),
        (lambda rows: rows[5].update(id=rows[0]["id"]), ":6: duplicate id"),
        (lambda rows: rows[0].pop("file_name"), ":1: 'file_name' must be"),
    ],
)
def test_load_folder_errors_name_the_line_and_file(folder, tmp_path, edit, message) -> None:
    copy = _copy(folder, tmp_path)
    rows: list = _rows(copy)
    edit(rows)
    (copy / "metadata.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    with pytest.raises(ValueError, match=message):
        load_folder(copy)


def test_load_folder_without_metadata(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        load_folder(tmp_path)


def test_decode_segment_uses_the_front_ends(folder: Path) -> None:
    from smart_turn_mm.audio import whisper_features
    from smart_turn_mm.video import prepare_video

    segment = next(s for s in load_folder(folder) if s.video)
    example = decode_segment(segment, num_frames=8, frame_size=32)
    assert example.features.shape == (80, 800) and example.features.dtype == np.float32
    np.testing.assert_array_equal(example.features, whisper_features(segment.audio))
    expected = prepare_video(segment.video, face_crop=False, num_frames=8, size=32).pixel_values
    np.testing.assert_array_equal(example.pixels, expected)
    assert decode_segment(segment, num_frames=8, frame_size=32, with_video=False).pixels is None


def test_decode_errors_name_the_segment(folder: Path, tmp_path: Path) -> None:
    copy = _copy(folder, tmp_path)
    segment = load_folder(copy)[0]
    Path(segment.audio).write_bytes(b"not audio")
    with pytest.raises(ValueError, match=f"segment '{segment.id}'.*audio"):
        decode_segment(segment, num_frames=8, frame_size=32)


def test_iter_batches_stacks_with_a_video_mask(folder: Path) -> None:
    segments = load_folder(folder)
    batches = list(iter_batches(segments, batch_size=4, num_frames=8, frame_size=32))
    assert [len(b.segments) for b in batches] == [4, 4, 4, 4, 2]
    for batch in batches:
        assert batch.features.shape == (len(batch.segments), 80, 800)
        assert batch.video_mask.tolist() == [s.video is not None for s in batch.segments]
        if batch.pixels is not None:
            assert batch.pixels.shape == (len(batch.segments), 3, 8, 32, 32)
            assert not batch.pixels[~batch.video_mask].any()  # rows without video stay zero


# --------------------------------------------------------------------------- Hugging Face


def _wav_bytes(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * 16000)) / 16000)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory) -> Path:
    """A save_to_disk dataset with the smart-turn-data-v3.2 schema (audio as bytes)."""
    import datasets

    n = 10
    table = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": _wav_bytes(0.3 + 0.05 * i), "path": None} for i in range(n)],
            "id": [f"hf{i}" for i in range(n)],
            "language": ["en"] * n,
            "endpoint_bool": [True, False, None, True, False, True, False, True, False, True],
        }
    ).cast_column("audio", datasets.Audio(decode=False))
    path = tmp_path_factory.mktemp("hub") / "smart-turn-like"
    table.save_to_disk(str(path))
    return path


def test_load_audio_dataset_keeps_bytes_and_decodes_them_ourselves(hub_like: Path) -> None:
    segments = load_audio_dataset(hub_like)
    assert len(segments) == 10
    assert [s.label for s in segments[:3]] == [True, False, None]
    assert all(isinstance(s.audio, HubAudio) and s.video is None for s in segments)
    assert segments[0].id == "hf0" and segments[0].language == "en"
    assert len({s.group for s in segments}) == 10  # no recording field: each row alone
    example = decode_segment(segments[1], num_frames=8, frame_size=32)
    assert example.features.shape == (80, 800) and example.pixels is None
    assert len(load_audio_dataset(hub_like, max_rows=4)) == 4


def test_load_audio_dataset_rejects_other_schemas(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "other"
    datasets.Dataset.from_dict({"text": ["a"], "label": [1]}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="missing column"):
        load_audio_dataset(path)


# --------------------------------------------------------------------------- split and mix


def test_split_by_group_never_separates_a_recording() -> None:
    segments = [_seg(i, f"g{i % 7}") for i in range(70)]
    kept, held = split_by_group(segments, 0.2, seed=3)
    assert len(kept) + len(held) == 70
    assert {s.group for s in kept}.isdisjoint({s.group for s in held})
    assert 14 <= len(held) <= 20
    assert split_by_group(segments, 0.2, seed=3) == (kept, held)  # deterministic
    assert split_by_group(segments, 0.0) == (segments, [])
    with pytest.raises(ValueError, match="fraction"):
        split_by_group(segments, 1.0)


def test_balance_and_mix_follow_the_recipe() -> None:
    video = [_seg(i, f"v{i}", label=i < 3, video=True) for i in range(10)]  # 3 pos, 7 neg
    video.append(_seg(99, "v99", label=None, video=True))
    balanced = balance_classes(drop_unlabelled(video))
    assert sum(bool(s.label) for s in balanced) == 7 == sum(s.label is False for s in balanced)
    audio = [_seg(100 + i, f"a{i}", label=i % 2 == 0) for i in range(200)]
    mix = mix_training_set(audio, video, video_share=0.25, seed=1)
    assert mix.audio_only == 200 and mix.video_unique == 10 and mix.video_balanced == 14
    assert mix.video_total == 50  # 0.25 x 200
    assert len(mix.segments) == 250
    assert all(s.label is not None for s in mix.segments)
    assert [s.group for s in mix.segments[:20]] != sorted(s.group for s in mix.segments[:20])
    # The share is an option; the video set is never cut below its balanced size.
    assert mix_training_set(audio, video, video_share=0.01).video_total == 14
    assert mix_training_set([], video).video_total == 14


def test_no_copy_of_a_segment_crosses_the_split(folder: Path) -> None:
    """Split first, then oversample: every copy of a held-out segment stays held out."""
    segments = drop_unlabelled(load_folder(folder))
    train, held = split_by_group(segments, 0.34, seed=0)
    mix = mix_training_set([], train, seed=0)
    assert len(mix.segments) >= len(train)
    check_disjoint(mix.segments, held)
    assert {s.key for s in mix.segments}.isdisjoint({s.key for s in held})
    with pytest.raises(ValueError, match="leakage"):
        check_disjoint(mix.segments, [*held, mix.segments[0]])


def test_prepare_data_splits_before_mixing(folder: Path, hub_like: Path) -> None:
    from smart_turn_mm.train import TrainConfig, prepare_data

    config = TrainConfig(
        data_dir=str(folder),
        audio_datasets=(str(hub_like),),
        test_dir=str(folder),
        eval_fraction=0.3,
        video_share=2.0,
    )
    with pytest.raises(ValueError, match="leakage"):  # the test folder IS the training data
        prepare_data(config)
    import dataclasses

    data = prepare_data(dataclasses.replace(config, test_dir=None))
    val = data.held_out["val"]
    assert val and set(data.held_out) == {"val"}
    assert {s.group for s in data.train}.isdisjoint({s.group for s in val})
    assert data.summary["train_audio_only"] > 0 and data.summary["train_video_total"] >= 1
    assert all(s.label is not None for s in [*data.train, *val])
    assert (
        data.fingerprint() == prepare_data(dataclasses.replace(config, test_dir=None)).fingerprint()
    )


# --------------------------------------------------------------------------- torch side


def test_epoch_sampler_is_deterministic_sharded_and_resumable() -> None:
    from smart_turn_mm.loader import EpochSampler

    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    full = [i for i, _ in sampler]
    assert sorted(full) == list(range(10)) and len(sampler) == 10
    sampler.set_epoch(2, start=4)
    assert [i for i, _ in sampler] == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != full
    shards = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    seen = [i for s in shards for i, _ in s]
    assert len(seen) == 12 and set(seen) == set(range(10))  # ceil(10 / 3) each, wrapped
    assert all(epoch == 2 for s in shards for _, epoch in s)


def test_dataset_collate_and_loader(folder: Path) -> None:
    from smart_turn_mm.loader import (
        EpochSampler,
        SegmentDataset,
        collate,
        make_loader,
        measure_throughput,
    )

    segments = load_folder(folder)
    dataset = SegmentDataset(segments, num_frames=8, frame_size=32, cache=True)
    item = dataset[0]
    assert item["input_features"].shape == (80, 800)
    assert item["label"] == float(segments[0].label)
    no_video = next(i for i, s in enumerate(segments) if s.video is None)
    assert dataset[no_video]["pixel_values"] is None
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["input_features"].shape == (18, 80, 800)
    assert batch["pixel_values"].shape == (18, 3, 8, 32, 32)
    assert batch["video_mask"].tolist() == [s.video is not None for s in segments]
    assert not batch["pixel_values"][~batch["video_mask"]].any()
    assert collate([dataset[no_video]])["pixel_values"] is None
    loader = make_loader(dataset, EpochSampler(len(dataset)), batch_size=4, num_workers=1)
    assert measure_throughput(loader, max_batches=3) > 0
    with pytest.raises(ValueError, match="unlabelled"):
        SegmentDataset([_seg(0, "g", label=None)], num_frames=8, frame_size=32)


def test_color_jitter_is_one_change_per_clip_and_reproducible(folder: Path) -> None:
    from smart_turn_mm.loader import ColorJitter, SegmentDataset, color_jitter
    from smart_turn_mm.video import normalize_clip

    frame = np.random.default_rng(0).integers(0, 256, size=(1, 16, 16, 3), dtype=np.uint8)
    clip = normalize_clip(np.repeat(frame, 4, axis=0))  # 4 identical frames
    out = color_jitter(clip, np.random.default_rng(5), ColorJitter())
    assert out.shape == clip.shape and out.dtype == np.float32
    assert not np.allclose(out, clip)
    for t in range(1, 4):  # the same change on every frame
        np.testing.assert_allclose(out[:, t], out[:, 0], atol=1e-6)
    segments = [s for s in load_folder(folder) if s.video]
    jittered = SegmentDataset(segments, num_frames=8, frame_size=32, jitter=ColorJitter(), seed=1)
    a, b = jittered[(0, 3)]["pixel_values"], jittered[(0, 3)]["pixel_values"]
    assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), jittered[(0, 4)]["pixel_values"].numpy())
