"""The demo page in real headless Chromium, with a fake microphone and camera fed from files.

Chromium plays a generated WAV (espeak-ng speech, a pause, then a question, then silence) as
its microphone and a generated Y4M clip (a real face) as its camera. The page must connect,
show speech, a commit and both probabilities; the screenshot is saved under
``tests/artifacts/`` (``$SMART_TURN_MM_ARTIFACTS`` overrides).

Needs Debian's ``chromium`` (apt) and the ``playwright`` Python package (its own browser
download is never used).
"""

from __future__ import annotations

import os
import shutil
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media import face_frames
from servers import serve_app
from talking_heads import espeak, have_espeak
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.demo import server
from smart_turn_mm.inference import load_model
from smart_turn_mm.media import write_wav

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian chromium is not installed (apt-get install chromium; CI installs it)",
    ),
    pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)"),
]
ARTIFACTS = Path(os.environ.get("SMART_TURN_MM_ARTIFACTS", Path(__file__).parent / "artifacts"))
FPS = 15


def fake_capture_files(folder: Path) -> tuple[Path, Path]:
    """speech.wav (16 kHz PCM) and face.y4m (320x240, 15 fps, I420) of the same length."""
    import av

    z = lambda s: np.zeros(round(s * 16000), np.float32)  # noqa: E731
    audio = np.concatenate(
        [z(0.5), espeak("so I was going to, um"), z(1.0), espeak("What time is it?"), z(3.2)]
    )
    wav = write_wav(folder / "speech.wav", audio)
    y4m = folder / "face.y4m"
    frames = face_frames(round(len(audio) / 16000 * FPS), 240, 320)
    with av.open(str(y4m), "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return wav, y4m


def test_demo_page_in_headless_chromium(tmp_path, tmp_path_factory):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip)"
    )
    wav, y4m = fake_capture_files(tmp_path)
    model = load_model(tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm"))
    args = [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        f"--use-file-for-fake-video-capture={y4m}",
        "--autoplay-policy=no-user-gesture-required",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    console: list[str] = []
    with serve_app(server.make_app(model)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{url}/?autostart=1&sensitivity=aggressive&fps={FPS}")
            deadline = time.monotonic() + 40
            state: dict = {}
            while time.monotonic() < deadline:
                state = page.evaluate("() => ({...document.body.dataset})")
                if int(state["commitCount"]) >= 1 and page.inner_text("#face-label") != (
                    "no frame yet"
                ):
                    break
                time.sleep(0.25)
            time.sleep(1.0)  # let the page settle for the screenshot
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "demo-browser.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            assert state.get("connected") == "true", (state, console)
            assert int(state["speechCount"]) >= 1 and int(state["commitCount"]) >= 1, console
            assert page.inner_text("#model") == Path(str(model.path)).name
            assert page.inner_text("#face-label") == "face found"
            assert page.inner_text("#verdict") != "waiting for speech"
            history = page.inner_text("#history")
            assert "speech start" in history and "turn complete" in history
            float(page.inner_text("#p-audio"))  # both probabilities are shown
            float(page.inner_text("#p-av"))
            assert page.inner_text("#sensitivity option:checked").startswith("Aggressive")
            assert not [line for line in console if line.startswith(("error", "pageerror"))]
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
