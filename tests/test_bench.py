"""The latency benchmark runs end to end on a tiny export (timings are not asserted)."""

from __future__ import annotations

from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.bench import run_benchmark, to_markdown


def test_benchmark_table(tmp_path_factory):
    model_dir = tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm").parent
    results = run_benchmark(model_dir, runs=1, warmup=0, gap_ms=0.0, precisions=("fp32",))
    stages = {(r["stage"], r["method"]) for r in results["rows"]}
    for stage in (
        "inference only, audio+video",
        "inference only, audio-only",
        "audio features",
        "video preprocessing",
        "end-to-end, audio+video",
        "end-to-end, audio-only",
    ):
        assert {(stage, "published"), (stage, "ours")} <= stages, stage
    assert results["face_found"] is True
    assert all(r["p50_ms"] > 0 and r["throughput_per_s"] > 0 for r in results["rows"])
    table = to_markdown(results, "smart-turn-mm bench --runs 1")
    assert "| video preprocessing |" in table and "speed-up" in table
    assert results["machine"]["cores"] >= 1
