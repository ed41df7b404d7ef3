"""The latency benchmark runs end to end on a tiny export (timings are not asserted)."""

from __future__ import annotations

import numpy as np
from media import write_test_video
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.bench import published_video, run_benchmark, to_markdown
from smart_turn_mm.video import KINETICS_MEAN, KINETICS_STD


def test_benchmark_table(tmp_path_factory):
    model_dir = tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm").parent
    results = run_benchmark(model_dir, runs=1, warmup=0, gap_ms=0.0, precisions=("fp32",))
    stages = {(r["stage"], r["method"]) for r in results["rows"]}
    for stage in (
        "inference only, audio+video",
        "inference only, audio-only",
        "audio features",
        "video preprocessing",
        "video preprocessing, baseline given the face box",
        "video preprocessing, ours without face detection",
        "end-to-end, audio+video",
        "end-to-end, audio-only",
    ):
        assert {(stage, "published"), (stage, "ours")} <= stages, stage
    assert results["face_found"] is True
    assert all(r["p50_ms"] > 0 and r["throughput_per_s"] > 0 for r in results["rows"])
    table = to_markdown(results, "smart-turn-mm bench --runs 1")
    assert "| video preprocessing |" in table and "speed-up" in table
    assert results["machine"]["cores"] >= 1


def test_published_video_baseline_squashes_the_whole_frame(tmp_path):
    # Left half black, right half white, 10 frames: the published path resizes the whole
    # frame (no crop) and pads a short clip with zeros after normalising; given a box, it
    # crops first.
    frame = np.zeros((96, 128, 3), np.uint8)
    frame[:, 64:] = 255
    path = tmp_path / "halves.mp4"
    write_test_video(path, [frame] * 10)
    clip = published_video(path, num_frames=16, size=32)
    assert clip.shape == (1, 3, 16, 32, 32) and clip.dtype == np.float32
    pixels = clip[0] * np.asarray(KINETICS_STD)[:, None, None, None]
    pixels += np.asarray(KINETICS_MEAN)[:, None, None, None]
    assert pixels[:, :10, :, :12].max() < 0.05 and pixels[:, :10, :, 20:].min() > 0.95
    assert not clip[0, :, 10:].any()  # zeros after normalisation, as published
    cropped = published_video(path, (64, 0, 128, 64), num_frames=16, size=32)
    cropped = cropped[0, :, :10] * np.asarray(KINETICS_STD)[:, None, None, None]
    assert (cropped + np.asarray(KINETICS_MEAN)[:, None, None, None]).min() > 0.95


def test_video_benchmark_script_runs_and_decodes_less_with_more_keyframes(tmp_path, capsys):
    # benchmarks/bench_video.py end to end (1 run): with a keyframe every 30 frames, ours
    # decodes from the keyframe before the last 32 frames instead of from the first frame.
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_video.py"
    spec = importlib.util.spec_from_file_location("bench_video", script)
    bench_video = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_video)
    decoded = {}
    for gop in (None, 30):
        out = tmp_path / f"gop-{gop}.json"
        argv = ["--runs", "1", "--warmup", "0", "--json", str(out)]
        assert bench_video.main(argv + ([] if gop is None else ["--gop", str(gop)])) == 0
        payload = json.loads(out.read_text())
        assert payload["gop"] == gop and payload["face_found"] is True
        assert "ours: prepare_video(path)" in payload["results"]
        decoded[gop] = payload["frames_decoded_by_ours"]
    assert "GOP 30" in capsys.readouterr().out
    # Default: one keyframe, so the window's 32 frames plus the reference frames before it
    # (non-reference frames before the window are skipped); GOP 30: from frame 30 on.
    assert 32 < decoded[30] < decoded[None] < 90
