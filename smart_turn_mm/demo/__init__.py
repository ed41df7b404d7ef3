"""The live web demo: ``smart-turn-mm demo`` (or ``python app_multimodal.py``).

A local aiohttp server (:mod:`smart_turn_mm.demo.server`, the ``demo`` extra) and a page with
no build step and nothing fetched from the network (``static/``): the browser streams its
microphone (16 kHz PCM from an AudioWorklet) and camera (JPEG frames) over a WebSocket, the
server runs one :class:`~smart_turn_mm.realtime.TurnDetector` per connection and pushes the
events back.
"""
