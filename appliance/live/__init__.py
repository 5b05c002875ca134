"""Live speech: `GET /ws/live` streams microphone audio in and partial/final text out.

- `vad` — streaming Silero VAD (the model shipped inside faster-whisper);
- `decoder` — one utterance to text (short encoder window with faster-whisper);
- `session` — the socket-free core (`LiveTranscriber`) and its asyncio driver (`LiveSession`);
- `routes` — the WebSocket route: origin check, limits, protocol, history.

The protocol is documented in README.md ("Live protocol").
"""

from __future__ import annotations

from quart import Quart

from appliance.live.routes import LiveRegistry, blueprint


def init_app(app: Quart) -> None:
    app.extensions["live"] = LiveRegistry()
    app.register_blueprint(blueprint)
