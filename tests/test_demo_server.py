"""The demo server: protocol, bad input, vanishing clients, 8 clients at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from fractions import Fraction
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from media import face_frames
from servers import serve_app
from talking_heads import espeak, have_espeak
from tiny_models import tiny_multimodal_onnx

from smart_turn_mm.demo import server
from smart_turn_mm.demo.server import KIND_AUDIO, KIND_FACE, KIND_JPEG, KIND_RGB, pack_header
from smart_turn_mm.inference import load_model
from smart_turn_mm.realtime import DetectorParams

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt)")
SR = 16000


@pytest.fixture(scope="module")
def v32_server(v32_onnx):
    with serve_app(server.make_app(load_model(v32_onnx), max_clients=10)) as url:
        yield url


@pytest.fixture(scope="module")
def mm_server(tmp_path_factory):
    model = load_model(tiny_multimodal_onnx(tmp_path_factory.getbasetemp() / "tiny-mm"))
    with serve_app(server.make_app(model, params=DetectorParams(threshold=0.0))) as url:
        yield url


def question(lead_s: float = 0.5, tail_s: float = 1.0) -> np.ndarray:
    speech = espeak("Can you tell me the weather in Paris?")
    parts = [np.zeros(round(lead_s * SR)), speech, np.zeros(round(tail_s * SR))]
    return (np.concatenate(parts) * 32767).astype("<i2")


def jpeg(rgb: np.ndarray) -> bytes:
    import av

    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    codec.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in codec.encode(frame))


class Client:
    """A test client: streams audio (and frames), collects what the server sends."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.faces: list[bytes] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.faces.append(msg.data)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    def events(self, kind: str | None = None) -> list[dict]:
        return [m for m in self.of("event") if kind is None or m["kind"] == kind]

    async def wait_for(self, predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.reader.done():
                raise AssertionError(f"timed out; received {self.messages[-5:]}")
            await asyncio.sleep(0.02)

    async def stream(self, pcm, speed: float = 2.0, frames=None, fps: float = 25.0, raw=False):
        t0, k = time.perf_counter(), 0
        for i in range(0, len(pcm), 320):
            end_s = (i + 320) / SR
            while frames is not None and k < len(frames) and k / fps <= end_s:
                f = frames[k]
                if raw:
                    msg = pack_header(KIND_RGB, k / fps, f.shape[1], f.shape[0]) + f.tobytes()
                else:
                    msg = pack_header(KIND_JPEG, k / fps, f.shape[1], f.shape[0]) + jpeg(f)
                await self.ws.send_bytes(msg)
                k += 1
            await self.ws.send_bytes(pack_header(KIND_AUDIO, i / SR) + pcm[i : i + 320].tobytes())
            await asyncio.sleep(max(0.0, t0 + end_s / speed - time.perf_counter()))


async def connect(session, url) -> Client:
    ws = await session.ws_connect(url + "/ws")
    client = Client(ws)
    await client.wait_for(lambda: client.of("ready"))
    return client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_page_and_static_files_are_local(v32_server):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(v32_server + "/") as r:
                assert r.status == 200 and "app.js" in await r.text()
            for name in ("app.js", "pcm-worklet.js", "style.css"):
                async with s.get(f"{v32_server}/static/{name}") as r:
                    assert r.status == 200
            async with s.get(v32_server + "/healthz") as r:
                health = await r.json()
            assert health["clients"] == 0 and health["model"].endswith(".onnx")

    run(main())
    static = Path(server.STATIC_DIR)
    for path in static.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:src|href)=\"https?://", text), f"{path.name} loads from the net"
        assert "cdn" not in text.lower()


def test_a_turn_over_the_websocket(v32_server):
    async def main():
        async with aiohttp.ClientSession() as s:
            c = await connect(s, v32_server)
            ready = c.of("ready")[0]
            assert ready["protocol"] == 1 and ready["has_video"] is False
            assert ready["params"]["redemption_ms"] == 300
            assert ready["presets"]["sensitivity"]["conservative"] == 0.7
            await c.stream(question())
            await c.wait_for(lambda: c.events("turn_complete"))
            done = c.events("turn_complete")[0]
            assert done["reason"] == "model" and done["probability"] > 0.5
            assert done["model_ms"] > 0 and done["delay_after_redemption_ms"] >= 0
            assert [e["kind"] for e in c.events()][:2] == ["speech_start", "speech_end"]
            states = {m["state"] for m in c.of("vad")}
            assert {"idle", "speech"} <= states and max(m["probability"] for m in c.of("vad")) > 0.9
            await c.ws.close()

    run(main())


def test_live_preset_switch(v32_server):
    async def main():
        async with aiohttp.ClientSession() as s:
            c = await connect(s, v32_server)
            await c.ws.send_str(json.dumps({"type": "params", "redemption": "fast"}))
            await c.wait_for(lambda: c.of("params"))
            assert c.of("params")[0]["params"]["redemption_ms"] == 200
            await c.ws.send_str(json.dumps({"type": "params", "sensitivity": "sluggish"}))
            await c.ws.send_str(json.dumps({"type": "params", "threshold": "high"}))
            await c.ws.send_str(json.dumps({"type": "params", "redemption_ms": -5}))
            await c.wait_for(lambda: len(c.of("error")) == 3)
            reasons = [m["reason"] for m in c.of("error")]
            assert "unknown Sensitivity 'sluggish'" in reasons[0]
            assert "threshold must be a number" in reasons[1] and "bad params" in reasons[2]
            await c.stream(question())
            await c.wait_for(lambda: c.events("turn_complete"))
            done = c.events("turn_complete")[0]
            # Due at 200 ms of silence (+ one 32 ms chunk); a late decision is delivered when
            # ready, by then the 2x stream has moved on by twice the delay.
            assert 200 <= done["silence_ms"] <= 232 + 2 * done["delay_after_redemption_ms"] + 64
            await c.ws.close()

    run(main())


def test_bad_messages_are_refused_logged_and_the_client_kept(v32_server, caplog):
    caplog.set_level(logging.WARNING, logger="smart_turn_mm.demo")
    bad_binary = [
        (b"\x01\x01", "shorter than the header"),
        (pack_header(9, 0.0), "unknown binary message kind 9"),
        (b"\x01\x02" + pack_header(KIND_AUDIO, 0.0)[2:], "protocol version 2"),
        (pack_header(KIND_AUDIO, float("nan")), "finite"),
        (pack_header(KIND_AUDIO, 0.0) + b"\x00" * 3, "not int16"),
        (pack_header(KIND_AUDIO, 0.0) + b"\x00" * 40000, "exceeds 16000"),
        (pack_header(KIND_JPEG, 0.0) + b"not a jpeg", "not a JPEG"),
        (pack_header(KIND_JPEG, 0.0) + b"\xff\xd8\xff\xe0garbage", "undecodable JPEG"),
        (pack_header(KIND_RGB, 0.0, 10, 10) + b"\x00" * 299, "needs 300 bytes"),
        (pack_header(KIND_RGB, 0.0, 5000, 10), "out of range"),
    ]
    bad_text = [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"type": "dance"}), "unknown message type 'dance'"),
        (json.dumps({"type": "params", "colour": "red"}), "unknown params fields"),
        ("x" * 5000, "exceeds 4096"),
    ]

    async def main():
        async with aiohttp.ClientSession() as s:
            c = await connect(s, v32_server)
            for data, _ in bad_binary:
                await c.ws.send_bytes(data)
            for data, _ in bad_text:
                await c.ws.send_str(data)
            # Out-of-order audio: 1 s of audio, then a chunk timestamped 0.5 s earlier.
            pcm = question()
            await c.ws.send_bytes(pack_header(KIND_AUDIO, 0.0) + pcm[:16000].tobytes())
            await c.ws.send_bytes(pack_header(KIND_AUDIO, 0.5) + pcm[:320].tobytes())
            n = len(bad_binary) + len(bad_text) + 1
            await c.wait_for(lambda: len(c.of("error")) == n)
            reasons = [m["reason"] for m in c.of("error")]
            for (_, expected), reason in zip(bad_binary + bad_text, reasons, strict=False):
                assert expected in reason, (expected, reason)
            assert "behind the stream clock" in reasons[-1]
            await c.ws.send_str(json.dumps({"type": "ping"}))
            await c.wait_for(lambda: c.of("pong"))  # still served
            await c.ws.close()

    run(main())
    assert caplog.text.count("refused message") == len(bad_binary) + len(bad_text) + 1
    assert "behind the stream clock" in caplog.text


def test_oversized_messages_and_vanishing_clients_leave_others_served(v32_server, caplog):
    caplog.set_level(logging.INFO, logger="smart_turn_mm.demo")

    async def main():
        async with aiohttp.ClientSession() as s:
            good = await connect(s, v32_server)
            streaming = asyncio.create_task(good.stream(question(), speed=1.5))
            # A client sending 5 MiB is closed with 1009 (message too big).
            big = await connect(s, v32_server)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await big.ws.send_bytes(pack_header(KIND_AUDIO, 0.0) + bytes(5 << 20))
            await big.wait_for(lambda: big.ws.closed or big.reader.done())
            # A client that vanishes mid-turn (no close handshake).
            gone = await connect(s, v32_server)
            await gone.stream(question()[: SR * 2], speed=4.0)
            gone.ws._response.connection.transport.abort()
            # Too many bad messages: closed with 1008.
            noisy = await connect(s, v32_server)
            for _ in range(server.MAX_ERRORS):
                await noisy.ws.send_bytes(b"junk")
            await noisy.wait_for(lambda: noisy.ws.closed)
            assert noisy.ws.close_code == 1008
            await streaming
            await good.wait_for(lambda: good.events("turn_complete"))
            await good.ws.close()
            await asyncio.sleep(0.3)
            async with s.get(v32_server + "/healthz") as r:
                assert (await r.json())["clients"] == 0

    run(main())
    assert "message larger than" in caplog.text
    assert re.search(r"disconnected \(code \d+\) mid-turn \(turn 1, speech\)", caplog.text)
    assert "refused messages: closing the connection" in caplog.text


def test_too_many_clients_get_503(tmp_path_factory, v32_onnx):
    async def main(url):
        async with aiohttp.ClientSession() as s:
            first = await connect(s, url)
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(url + "/ws")
            assert info.value.status == 503
            await first.ws.close()

    with serve_app(server.make_app(load_model(v32_onnx), max_clients=1)) as url:
        run(main(url))


def test_eight_clients_at_once_each_get_their_decisions(v32_server):
    async def one(s, i):
        c = await connect(s, v32_server)
        await asyncio.sleep(0.05 * i)
        await c.stream(question(lead_s=0.3 + 0.1 * i), speed=1.0)
        await c.wait_for(lambda: c.events("turn_complete"), timeout=30)
        await c.ws.close()
        return c

    async def main():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(one(s, i) for i in range(8)))

    clients = run(main())
    for c in clients:
        done = c.events("turn_complete")
        assert len(done) == 1 and done[0]["reason"] == "model"
        assert done[0]["turn_id"] == 1 and done[0]["model_ms"] > 0
    sessions = {c.of("ready")[0]["session"] for c in clients}
    assert len(sessions) == 8


def test_video_frames_face_crops_and_both_probabilities(mm_server):
    frames = face_frames(90, 240, 320)

    async def main():
        async with aiohttp.ClientSession() as s:
            c = await connect(s, mm_server)
            assert c.of("ready")[0]["has_video"] is True
            await c.stream(question(tail_s=0.6), speed=3.0, frames=frames)
            await c.wait_for(lambda: c.events("turn_complete"))
            done = c.events("turn_complete")[0]
            assert done["av_probability"] is not None and done["face_found"] is True
            assert done["audio_probability"] is not None
            assert c.faces, "no face crop was sent"
            face = c.faces[-1]
            assert face[0] == KIND_FACE and int.from_bytes(face[6:8], "little") == 1
            assert len(face) == 16 + server.PREVIEW_SIZE**2 * 3
            # Raw RGB frames work too; a frame of another size is refused by its byte count.
            await c.ws.send_str(json.dumps({"type": "reset"}))
            await c.wait_for(lambda: c.of("reset"))
            await c.stream(question(tail_s=0.6), speed=3.0, frames=frames, raw=True)
            await c.wait_for(lambda: len(c.events("turn_complete")) == 2)
            assert c.events("turn_complete")[1]["av_probability"] is not None
            f = frames[0]
            await c.ws.send_bytes(pack_header(KIND_RGB, 9.0, 100, 100) + f.tobytes())
            await c.ws.send_bytes(pack_header(KIND_JPEG, 9.0, 640, 480) + jpeg(f))
            await c.wait_for(lambda: len(c.of("error")) == 2)
            assert "needs 30000 bytes" in c.of("error")[0]["reason"]
            assert "header says 640x480" in c.of("error")[1]["reason"]
            await c.ws.close()

    run(main())


def test_app_multimodal_script_help():
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "app_multimodal.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--port" in out and "--redemption" in out and "--sensitivity" in out
