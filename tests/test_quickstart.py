"""The offline quickstart, end to end at a very small size (slow: it exports ONNX too)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quickstart_small(tmp_path) -> None:
    from smart_turn_mm.quickstart import run_quickstart

    lines: list[str] = []
    result = run_quickstart(
        tmp_path / "qs",
        recordings=6,
        test_recordings=3,
        segments_per_recording=3,
        stage1_epochs=1.0,
        stage2_steps=1,
        batch_size=8,
        bootstrap=20,
        echo=lines.append,
    )
    text = "\n".join(lines)
    for n in range(1, 6):
        assert f"[{n}/5]" in text
    assert result.export_dir is not None and (result.export_dir / "export-report.json").is_file()
    assert (result.out_dir / "eval" / "predictions.csv").is_file()
    assert set(result.test_metrics) >= {"audio_video", "audio_only", "ci", "delta_ci"}
    assert all(0.0 <= p["audio_video"] <= 1.0 for p in result.predictions)
    assert set(result.timings_s) >= {"generate", "train", "evaluate", "export", "predict", "total"}
