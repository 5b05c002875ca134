"""Live speech: `GET /ws/live` streams microphone audio in and partial/final text out.

- `routes` — the WebSocket route: origin check, limits, protocol, history;
- `realtime` — OpenAI's Realtime transcription protocol (`/v1/realtime`) on the same route code;
- the speech side lives in `appliance.core.live`: `vad` (streaming Silero VAD), `decoder` (one
  utterance to text), `session` (the socket-free `LiveTranscriber` and its driver).

The protocol is documented in docs/reference/live-protocol.md.
"""

from __future__ import annotations

from quart import Quart

from appliance.web.live import realtime
from appliance.web.live.routes import LiveRegistry, blueprint


def init_app(app: Quart) -> None:
    app.extensions["live"] = LiveRegistry()
    app.register_blueprint(blueprint)
    app.register_blueprint(realtime.blueprint)  # issue 14: OpenAI Realtime at /v1/realtime
