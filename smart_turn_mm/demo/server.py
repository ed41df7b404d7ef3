"""The demo server: ``smart-turn-mm demo [--model M] [--port 8080]``, then open the page.

One :class:`~smart_turn_mm.realtime.TurnDetector` per WebSocket connection; the model's ONNX
Runtime sessions are shared. Detector calls run on a thread per connection (in order), model
runs on each detector's worker thread, so the event loop only moves bytes and one slow or
misbehaving client never holds up the others.

WebSocket protocol (``/ws``), version 1
---------------------------------------

Binary messages, client -> server: a 16-byte little-endian header, then the payload::

    offset  type     field
    0       uint8    kind: 1 = audio, 2 = JPEG frame, 3 = raw RGB frame
    1       uint8    protocol version (1)
    2       uint16   width  (frames; 0 for audio)
    4       uint16   height (frames; 0 for audio)
    6       uint16   reserved (0)
    8       float64  timestamp in seconds on the stream clock: for audio the time of the
                     first sample (samples sent before / 16000), for a frame its capture time

* audio: mono PCM, int16 little-endian, 16 kHz, at most 1 s (16,000 samples) a message;
  timestamps must not go backwards (more than 0.1 s behind the clock is refused); a gap is
  filled with silence;
* JPEG frame: the JPEG file's bytes (at most 1 MiB); width/height may be 0 (read from the
  image) or must match it;
* raw RGB frame: ``width * height * 3`` bytes, row-major RGB; at most 1920 x 1920.

Text messages, client -> server (JSON objects, at most 4 KiB):

* ``{"type": "params", "redemption": "fast"|"balanced"|"relaxed", "sensitivity":
  "aggressive"|"normal"|"conservative", "redemption_ms": 300, "threshold": 0.5,
  "max_silence_ms": 3000}`` (every field optional): switch settings live; answered with
  ``{"type": "params", "params": {...}}``;
* ``{"type": "reset"}``: forget the stream (new clock); ``{"type": "ping"}``.

Server -> client:

* text ``{"type": "ready", ...}`` on connect (model, whether it uses video, params, presets,
  limits); ``{"type": "vad", "time_s", "probability", "state"}`` at most every 50 ms;
  ``{"type": "event", ...}`` for each :class:`~smart_turn_mm.realtime.TurnEvent`
  (``TurnEvent.to_dict()``); ``{"type": "error", "reason": ...}`` for each refused message;
* binary kind 16: the current face crop, the same 16-byte header (width, height; the
  reserved field is 1 when a face was found) followed by RGB bytes.

Limits: messages above 4 MiB close the connection (code 1009); after 50 refused messages the
connection is closed (code 1008); at most ``--max-clients`` connections (HTTP 503 beyond).
Every refusal is logged with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from smart_turn_mm.audio import SAMPLE_RATE
from smart_turn_mm.realtime import (
    DetectorParams,
    RedemptionPreset,
    Sensitivity,
    TurnDetector,
    TurnEvent,
)

__all__ = [
    "HEADER",
    "KIND_AUDIO",
    "KIND_FACE",
    "KIND_JPEG",
    "KIND_RGB",
    "ProtocolError",
    "add_arguments",
    "make_app",
    "pack_header",
    "run",
]

log = logging.getLogger("smart_turn_mm.demo")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROTOCOL_VERSION = 1
# kind (u8), version (u8), width (u16), height (u16), reserved / flags (u16), timestamp (f64).
HEADER = struct.Struct("<BBHHHd")
KIND_AUDIO = 1
KIND_JPEG = 2
KIND_RGB = 3
KIND_FACE = 16
# Limits (see the module docstring).
MAX_MESSAGE_BYTES = 4 << 20
MAX_TEXT_BYTES = 4096
MAX_AUDIO_SAMPLES = SAMPLE_RATE
MAX_JPEG_BYTES = 1 << 20
MAX_FRAME_SIDE_IN = 1920
MAX_ERRORS = 50
DEFAULT_MAX_CLIENTS = 16
VAD_INTERVAL_S = 0.05
FACE_INTERVAL_S = 0.5
# Side of the face crop shown on the page (the model's own input size for published models).
PREVIEW_SIZE = 112


class ProtocolError(ValueError):
    """A client message that breaks the protocol; the text is the reason sent back."""


def pack_header(kind: int, timestamp_s: float, width: int = 0, height: int = 0, flags: int = 0):
    """The 16-byte header of a binary message."""
    return HEADER.pack(kind, PROTOCOL_VERSION, width, height, flags, timestamp_s)


def parse_binary(data: bytes) -> tuple[int, int, int, float, memoryview]:
    """(kind, width, height, timestamp, payload) of a client message, checked."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"binary message of {len(data)} bytes is shorter than the header")
    kind, version, width, height, _, timestamp = HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} not supported (expected 1)")
    if not np.isfinite(timestamp) or timestamp < 0:
        raise ProtocolError(f"timestamp must be a finite number >= 0, got {timestamp}")
    payload = memoryview(data)[HEADER.size :]
    if kind == KIND_AUDIO:
        if len(payload) % 2:
            raise ProtocolError(f"audio payload of {len(payload)} bytes is not int16 samples")
        if len(payload) // 2 > MAX_AUDIO_SAMPLES:
            raise ProtocolError(
                f"audio message of {len(payload) // 2} samples exceeds {MAX_AUDIO_SAMPLES}"
            )
    elif kind == KIND_JPEG:
        if len(payload) > MAX_JPEG_BYTES:
            raise ProtocolError(f"JPEG of {len(payload)} bytes exceeds {MAX_JPEG_BYTES}")
        if len(payload) < 4 or bytes(payload[:2]) != b"\xff\xd8":
            raise ProtocolError("frame payload is not a JPEG image")
    elif kind == KIND_RGB:
        if not (0 < width <= MAX_FRAME_SIDE_IN and 0 < height <= MAX_FRAME_SIDE_IN):
            raise ProtocolError(
                f"raw frame size {width}x{height} out of range (1-{MAX_FRAME_SIDE_IN})"
            )
        if len(payload) != width * height * 3:
            raise ProtocolError(
                f"raw RGB frame {width}x{height} needs {width * height * 3} bytes, "
                f"got {len(payload)}"
            )
    else:
        raise ProtocolError(f"unknown binary message kind {kind}")
    return kind, width, height, float(timestamp), payload


def decode_jpeg(data: bytes | memoryview, width: int = 0, height: int = 0) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3) RGB; the header's size, when given, must match."""
    import av

    from smart_turn_mm.face import sws_options

    codec = av.CodecContext.create("mjpeg", "r")
    try:
        frames = codec.decode(av.Packet(bytes(data)))
    except av.error.FFmpegError as e:
        raise ProtocolError(f"undecodable JPEG frame: {e}") from e
    if not frames:
        raise ProtocolError("undecodable JPEG frame: no picture")
    frame = frames[0]
    if frame.width > MAX_FRAME_SIDE_IN or frame.height > MAX_FRAME_SIDE_IN:
        raise ProtocolError(f"JPEG frame {frame.width}x{frame.height} is too large")
    if (width or height) and (width, height) != (frame.width, frame.height):
        raise ProtocolError(
            f"JPEG frame is {frame.width}x{frame.height} but the header says {width}x{height}"
        )
    return frame.to_ndarray(format="rgb24", **sws_options())


def _params_update(params: DetectorParams, message: dict[str, Any]) -> DetectorParams:
    changes: dict[str, Any] = {}
    if "redemption" in message:
        changes["redemption_ms"] = _preset(RedemptionPreset, message["redemption"]).value
    if "sensitivity" in message:
        changes["threshold"] = _preset(Sensitivity, message["sensitivity"]).value
    for key in ("redemption_ms", "threshold", "max_silence_ms"):
        if key in message:
            value = message[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(f"{key} must be a number, got {value!r}")
            changes[key] = float(value)
    unknown = set(message) - {"type", "redemption", "sensitivity", *changes}
    if unknown:
        raise ProtocolError(f"unknown params fields: {sorted(unknown)}")
    if "max_silence_ms" not in changes and "redemption_ms" in changes:
        changes["max_silence_ms"] = max(params.max_silence_ms, changes["redemption_ms"])
    try:
        return params.replace(**changes)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"bad params: {e}") from e


def _preset(kind: Any, name: Any) -> Any:
    if not isinstance(name, str) or name.upper() not in kind.__members__:
        names = ", ".join(m.name.lower() for m in kind)
        raise ProtocolError(f"unknown {kind.__name__} {name!r}; one of: {names}")
    return kind[name.upper()]


class _State:
    """What all connections share: the model, default params, the open sessions."""

    def __init__(self, model: Any, params: DetectorParams, max_clients: int) -> None:
        self.model = model
        self.params = params
        self.max_clients = max_clients
        self.sessions: set[_Session] = set()
        self.ids = itertools.count(1)
        self.stats = {"connections": 0, "refused_messages": 0, "events": 0}


class _Session:
    """One browser connection: its detector, its thread and its bookkeeping."""

    def __init__(self, state: _State, ws: Any, peer: str | None) -> None:
        self.state = state
        self.ws = ws
        self.sid = next(state.ids)
        self.name = f"client {self.sid} ({peer or '?'})"
        self.errors = 0
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"demo-{self.sid}")
        self.ready = asyncio.Event()
        self.detector = TurnDetector(
            state.model, params=state.params, wait_for_model=False, on_ready=self._on_ready
        )
        self.last_vad = 0.0
        self.last_face = 0.0
        self.latest_frame: np.ndarray | None = None
        self.face_detector: Any = None
        self.closed = False

    def _on_ready(self) -> None:  # the detector's worker thread
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(self.ready.set)

    async def call(self, fn: Any, *args: Any) -> Any:
        return await self.loop.run_in_executor(self.executor, fn, *args)

    async def send_json(self, message: dict[str, Any]) -> None:
        if self.closed or self.ws.closed:
            return
        try:
            await self.ws.send_str(json.dumps(message))
        except (ConnectionError, RuntimeError) as e:
            log.info("%s: cannot send (%s): the client is gone", self.name, e)
            self.closed = True

    async def send_events(self, events: list[TurnEvent]) -> None:
        for event in events:
            self.state.stats["events"] += 1
            await self.send_json({"type": "event", **event.to_dict()})
            if event.kind.value in ("decision", "turn_complete") and event.model_ms is not None:
                log.info("%s: %s", self.name, event)

    async def refuse(self, reason: str) -> None:
        self.errors += 1
        self.state.stats["refused_messages"] += 1
        log.warning("%s: refused message: %s", self.name, reason)
        await self.send_json({"type": "error", "reason": reason})
        if self.errors >= MAX_ERRORS:
            log.warning("%s: %d refused messages: closing the connection", self.name, self.errors)
            await self.ws.close(code=1008, message=b"too many bad messages")

    def ready_message(self) -> dict[str, Any]:
        model = self.state.model
        return {
            "type": "ready",
            "protocol": PROTOCOL_VERSION,
            "session": self.sid,
            "model": Path(str(getattr(model, "path", "model"))).name,
            "has_video": bool(getattr(model, "has_video", False)),
            "num_frames": getattr(model, "num_frames", None),
            "sample_rate": SAMPLE_RATE,
            "params": self.detector.params.to_dict(),
            "presets": {
                "redemption": {p.name.lower(): p.value for p in RedemptionPreset},
                "sensitivity": {s.name.lower(): s.value for s in Sensitivity},
            },
            "limits": {
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "max_audio_samples": MAX_AUDIO_SAMPLES,
                "max_jpeg_bytes": MAX_JPEG_BYTES,
            },
        }

    async def serve(self) -> None:
        from aiohttp import WSMsgType

        poller = asyncio.create_task(self._poll_loop())
        try:
            await self.send_json(self.ready_message())
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self.on_binary(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self.on_text(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    error = self.ws.exception()
                    if getattr(error, "code", None) == 1009:
                        log.warning(
                            "%s: message larger than %d bytes (%s): closing",
                            self.name,
                            MAX_MESSAGE_BYTES,
                            error,
                        )
                    else:
                        log.warning("%s: connection error: %s", self.name, error)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        code = self.ws.close_code
        mid_turn = self.detector.state != "idle"
        log.info(
            "%s: disconnected (code %s)%s",
            self.name,
            code,
            f" mid-turn (turn {self.detector.turn_id}, {self.detector.state})" if mid_turn else "",
        )

    def close(self) -> None:
        self.closed = True
        self.detector.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _poll_loop(self) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            await self.send_events(await self.call(self.detector.poll))

    async def on_binary(self, data: bytes) -> None:
        try:
            kind, width, height, timestamp, payload = parse_binary(data)
            if kind == KIND_AUDIO:
                pcm = np.frombuffer(payload, dtype="<i2")
                events = await self.call(self.detector.push_audio, pcm, SAMPLE_RATE, timestamp)
                await self.send_events(events)
                await self._send_vad()
            else:
                await self.call(self._take_frame, kind, width, height, timestamp, payload)
                await self._send_face()
        except (ValueError, TypeError) as e:
            await self.refuse(str(e))

    def _take_frame(
        self, kind: int, width: int, height: int, timestamp: float, payload: memoryview
    ) -> None:
        if kind == KIND_JPEG:
            rgb = decode_jpeg(payload, width, height)
        else:
            rgb = np.frombuffer(payload, np.uint8).reshape(height, width, 3)
        if self.latest_frame is not None and self.latest_frame.shape != rgb.shape:
            log.info("%s: frame size changed to %dx%d", self.name, rgb.shape[1], rgb.shape[0])
        self.latest_frame = rgb
        self.detector.push_frame(rgb, timestamp)

    async def _send_vad(self) -> None:
        now = time.monotonic()
        if now - self.last_vad < VAD_INTERVAL_S:
            return
        self.last_vad = now
        d = self.detector
        await self.send_json(
            {
                "type": "vad",
                "time_s": d.time_s,
                "probability": d.vad_probability,
                "state": d.state,
                "turn_id": d.turn_id,
            }
        )

    async def _send_face(self) -> None:
        now = time.monotonic()
        if now - self.last_face < FACE_INTERVAL_S or self.latest_frame is None:
            return
        self.last_face = now
        crop, found = await self.call(self._face_crop, self.latest_frame)
        if self.closed or self.ws.closed:
            return
        header = pack_header(KIND_FACE, self.detector.time_s, crop.shape[1], crop.shape[0], found)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_bytes(header + crop.tobytes())

    def _face_crop(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """The face crop of one frame, by the project's one crop rule (for display)."""
        from smart_turn_mm.face import clip_face_box, crop_frames

        box, found = clip_face_box([rgb], self.face_detector)
        return crop_frames([rgb], box, PREVIEW_SIZE)[0], found

    async def on_text(self, data: str) -> None:
        try:
            if len(data) > MAX_TEXT_BYTES:
                raise ProtocolError(f"text message of {len(data)} characters exceeds 4096")
            try:
                message = json.loads(data)
            except json.JSONDecodeError as e:
                raise ProtocolError(f"text message is not JSON: {e}") from e
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ProtocolError('text message must be a JSON object with a "type"')
            kind = message["type"]
            if kind == "params":
                params = _params_update(self.detector.params, message)
                await self.call(setattr, self.detector, "params", params)
                log.info("%s: params %s", self.name, params)
                await self.send_json({"type": "params", "params": params.to_dict()})
            elif kind == "reset":
                await self.call(self.detector.reset)
                await self.send_json({"type": "reset"})
            elif kind == "ping":
                await self.send_json({"type": "pong", "time_s": self.detector.time_s})
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except (ValueError, TypeError) as e:
            await self.refuse(str(e))


def make_app(
    model: Any = None,
    *,
    params: DetectorParams | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> Any:
    """The aiohttp application: ``/`` (the page), ``/static/*``, ``/ws``, ``/healthz``.

    Args:
        model: a loaded :class:`~smart_turn_mm.inference.TurnModel`, a path, or ``None``.
        params: the detector settings each connection starts with.
        max_clients: connections served at once.
    """
    from aiohttp import web

    from smart_turn_mm.inference import load_model

    state = _State(load_model(model), params or DetectorParams(), max_clients)
    state_key = web.AppKey("state", _State)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        st = request.app[state_key]
        return web.json_response(
            {
                "model": str(getattr(st.model, "path", "")),
                "clients": len(st.sessions),
                "max_clients": st.max_clients,
                **st.stats,
            }
        )

    async def websocket(request: web.Request) -> web.StreamResponse:
        st = request.app[state_key]
        if len(st.sessions) >= st.max_clients:
            log.warning("refused a connection from %s: %d clients", request.remote, st.max_clients)
            return web.Response(status=503, text=f"at most {st.max_clients} clients at once")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30.0)
        await ws.prepare(request)
        session = _Session(st, ws, request.remote)
        st.sessions.add(session)
        st.stats["connections"] += 1
        log.info("%s: connected", session.name)
        try:
            await session.serve()
        except Exception:  # a bug must not take the server down: log it, drop this client
            log.exception("%s: session failed", session.name)
        finally:
            st.sessions.discard(session)
            session.close()
        return ws

    async def on_shutdown(app: web.Application) -> None:
        for session in list(app[state_key].sessions):
            await session.ws.close(code=1001, message=b"server shutdown")

    app = web.Application()
    app[state_key] = state
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static/", STATIC_DIR)
    app.on_shutdown.append(on_shutdown)
    return app


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smart-turn-mm demo``."""
    parser.add_argument("-m", "--model", help="ONNX model file, export directory or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--redemption",
        choices=[p.name.lower() for p in RedemptionPreset],
        default="balanced",
        help="initial redemption preset (switchable on the page)",
    )
    parser.add_argument(
        "--sensitivity",
        choices=[s.name.lower() for s in Sensitivity],
        default="normal",
        help="initial sensitivity preset (switchable on the page)",
    )
    parser.add_argument("--max-silence-ms", type=float, default=3000.0)
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING...")


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    params = DetectorParams.preset(
        args.redemption, args.sensitivity, max_silence_ms=args.max_silence_ms
    )
    app = make_app(args.model, params=params, max_clients=args.max_clients)
    print(f"smart-turn-mm demo: open http://{args.host}:{args.port}/ (Ctrl+C to stop)")
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
