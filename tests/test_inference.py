"""predict_endpoint and model loading on real ONNX Runtime sessions (no torch needed here)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from signals import speech_like

from smart_turn_mm.audio import whisper_features
from smart_turn_mm.inference import (
    MODEL_ENV,
    EndpointResult,
    ModelNotFoundError,
    load_model,
    predict_endpoint,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio = speech_like(3.0, seed=3)
    audio[-3200:] = 0.0  # 200 ms of silence at the end, as a live detector would send
    return audio


def test_v32_file_results_identical_to_raw_session(v32_onnx, speech):
    import onnxruntime as ort

    result = predict_endpoint(speech, model=v32_onnx)
    raw = ort.InferenceSession(str(v32_onnx), providers=["CPUExecutionProvider"])
    expected = raw.run(None, {"input_features": whisper_features(speech)[None]})[0][0, 0]
    assert result.probability == pytest.approx(float(expected), abs=1e-6)
    assert result["prediction"] == int(result.probability > 0.5)
    assert result.used_video is False and result.face_found is None


def test_result_reads_like_published_dict(v32_onnx, speech):
    result = predict_endpoint(speech, model=v32_onnx)
    assert isinstance(result, EndpointResult)
    as_dict = dict(result)
    assert {"prediction", "probability"} <= set(as_dict)
    assert as_dict["probability"] == result.probability
    assert set(result.timings_ms) >= {"audio_features_ms", "model_ms", "total_ms"}
    with pytest.raises(KeyError):
        result["nope"]


def test_video_ignored_by_audio_only_model(v32_onnx, speech):
    frames = np.zeros((4, 48, 64, 3), np.uint8)
    result = predict_endpoint(speech, frames, model=v32_onnx)
    assert result.used_video is False
    assert result.probability == predict_endpoint(speech, model=v32_onnx).probability


def test_other_sample_rates_and_paths(v32_onnx, speech, tmp_path):
    import wave

    at_16k = predict_endpoint(speech, model=v32_onnx).probability
    # Same audio given as int16 at 16 kHz and as a WAV file.
    pcm = (speech * 32767).astype(np.int16)
    assert predict_endpoint(pcm, model=v32_onnx).probability == pytest.approx(at_16k, abs=0.02)
    path = tmp_path / "turn.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    assert predict_endpoint(path, model=v32_onnx).probability == pytest.approx(at_16k, abs=0.02)
    # 48 kHz in, resampled.
    up = np.repeat(speech, 3)
    p48 = predict_endpoint(up, model=v32_onnx, sample_rate=48000).probability
    assert 0.0 <= p48 <= 1.0


def test_threshold_and_bad_threshold(v32_onnx, speech):
    p = predict_endpoint(speech, model=v32_onnx).probability
    assert predict_endpoint(speech, model=v32_onnx, threshold=1.0).prediction == 0
    assert predict_endpoint(speech, model=v32_onnx, threshold=0.0).prediction == int(p > 0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        predict_endpoint(speech, model=v32_onnx, threshold=2.0)


def test_sessions_are_cached(v32_onnx):
    assert load_model(v32_onnx) is load_model(v32_onnx)
    assert load_model(v32_onnx, threads=1) is not load_model(v32_onnx)


def test_concurrent_calls_match_serial(v32_onnx):
    clips = [speech_like(1.0 + 0.5 * i, seed=i) for i in range(8)]
    serial = [predict_endpoint(c, model=v32_onnx).probability for c in clips]
    results: list[float | None] = [None] * 8

    def worker(i: int) -> None:
        results[i] = predict_endpoint(clips[i], model=v32_onnx).probability

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_model_resolution(v32_onnx, tmp_path, monkeypatch):
    assert resolve_model_path(v32_onnx) == v32_onnx
    assert resolve_model_path(v32_onnx.parent) == v32_onnx  # a directory with one model
    monkeypatch.setenv(MODEL_ENV, str(v32_onnx))
    assert resolve_model_path(None) == v32_onnx
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "gone.onnx"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # Falls through env and the (offline) Hub to the v3.2 file in pipecat-ai.
    assert resolve_model_path(None) == v32_onnx
    with pytest.raises(ModelNotFoundError, match=r"explicit path: .*missing\.onnx does not exist"):
        resolve_model_path(tmp_path / "missing.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"has no Smart Turn \.onnx file"):
        resolve_model_path(tmp_path / "empty")


def test_bad_model_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not an onnx file")
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        load_model(corrupt)


def test_unexpected_inputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", 80, 800])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 80, 800])
    graph = helper.make_graph([helper.make_node("Identity", ["audio"], ["logits"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, path)
    with pytest.raises(ValueError, match="not a Smart Turn model"):
        load_model(path)


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        (np.zeros((1, 80, 700), np.float32), ValueError, r"shape \(B, 80, 800\)"),
        (np.zeros((1, 80, 800), np.float64), TypeError, "float32"),
    ],
)
def test_bad_feature_tensors(v32_onnx, features, error, match):
    with pytest.raises(error, match=match):
        load_model(v32_onnx).predict(features)


def test_inference_path_imports_no_torch():
    code = (
        "import sys, smart_turn_mm, smart_turn_mm.inference, smart_turn_mm.cli;"
        "from smart_turn_mm import predict_endpoint;"
        "bad = [m for m in ('torch', 'transformers', 'torchvision', 'datasets', 'onnx', 'cv2')"
        " if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_cli_predict_json(v32_onnx, tmp_path, speech):
    import json
    import wave

    path = tmp_path / "turn.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((speech * 32767).astype(np.int16).tobytes())
    script = Path(__file__).parents[1] / "inference_multimodal.py"
    out = subprocess.run(
        [sys.executable, str(script), "-a", str(path), "-m", str(v32_onnx), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.stdout)
    assert data["prediction"] in (0, 1) and 0.0 <= data["probability"] <= 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "smart_turn_mm.cli", "predict", "-a", str(tmp_path / "no.wav")],
        capture_output=True,
        text=True,
        env={"SMART_TURN_MM_MODEL": str(v32_onnx), "PATH": ""},
    )
    assert bad.returncode == 1 and "no.wav" in bad.stderr


def test_multimodal_predict_matches_parts(tmp_path_factory, speech):
    """The overlapped video path equals running the model on the same preprocessed inputs."""
    from tiny_models import tiny_multimodal_onnx

    from smart_turn_mm.video import prepare_video

    model = load_model(tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm"))
    assert model.split and model.has_video
    frames = np.random.default_rng(1).integers(0, 255, (10, 40, 60, 3), dtype=np.uint8)
    result = predict_endpoint(speech, frames, model=model, face_crop=False)
    pixels = prepare_video(
        frames, face_crop=False, num_frames=model.num_frames, size=model.frame_size
    ).pixel_values[None]
    expected = model.predict(whisper_features(speech)[None], pixels)[0]
    assert result.used_video and result.probability == pytest.approx(float(expected), abs=1e-6)
    no_video = predict_endpoint(speech, model=model)
    assert not no_video.used_video
    assert no_video.probability == pytest.approx(
        float(model.predict(whisper_features(speech)[None])[0]), abs=1e-6
    )
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        predict_endpoint(speech, np.zeros((4, 40, 60), np.uint8), model=model)


def test_audio_graph_beside_video_has_one_thread(tmp_path_factory, speech):
    """Beside the video branch the audio graph runs in a 1-thread session, same numbers."""
    from tiny_models import tiny_multimodal_onnx

    path = tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm")
    features = whisper_features(speech)[None]
    model = load_model(path)
    beside = model._audio_beside_video()
    assert beside is not model._sessions["audio"]
    assert beside.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(
        model.audio_embedding(features, beside_video=True),
        model.audio_embedding(features),
        atol=1e-6,
    )
    single = load_model(path, threads=1)  # already one thread: no second session
    assert single._audio_beside_video() is single._sessions["audio"]
