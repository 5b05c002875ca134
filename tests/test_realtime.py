"""OpenAI Realtime transcription at `/v1/realtime`, on the live-speech core.

The official `openai` client's Realtime WebSocket client against a real server (Hypercorn),
streaming a real clip at real-time pace; bad client events get OpenAI-shaped `error` events
and the session goes on; the server stays healthy, with no session or model left held.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import av
import httpx
import jiwer
import numpy as np
import openai
import pytest
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError
from websockets.asyncio.client import ClientConnection, connect

from appliance.web.app import create_app
from appliance.web.live.realtime import Resampler
from tests.conftest import JFK_TEXT, Server, make_settings
from tests.test_ws_live import assert_healthy, normalize

RATE = 24_000
CHUNK = 4800  # bytes: 100 ms of 24 kHz PCM16


def pcm24(path: Path) -> bytes:
    """The clip as OpenAI's pcm16: 24 kHz mono s16le."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    blocks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            frame.pts = None
            blocks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        blocks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(blocks).astype("<i2").tobytes()


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def realtime_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def assert_error_shape(event: dict[str, Any]) -> dict[str, Any]:
    assert event["type"] == "error", event
    assert isinstance(event["event_id"], str) and event["event_id"]
    error = event["error"]
    assert error["type"] == "invalid_request_error", event
    assert set(error) == {"type", "code", "message", "param", "event_id"}, event
    assert isinstance(error["code"], str) and error["message"]
    return error


async def next_event(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if kind is None or event["type"] == kind:
            return event


def test_resampler_keeps_time_and_tone() -> None:
    tone = (np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE) * 8000).astype("<i2").tobytes()
    resample = Resampler()
    out = b"".join(resample(tone[i : i + CHUNK]) for i in range(0, len(tone), CHUNK))
    samples = np.frombuffer(out, dtype="<i2").astype(np.float32)
    assert abs(samples.size - 16_000) <= 64  # one second in, one second out (filter delay)
    spectrum = np.abs(np.fft.rfft(samples[-8000:]))
    assert abs(np.argmax(spectrum) * 16_000 / 8000 - 440) <= 4


async def test_openai_client_transcribes_in_real_time(server: Server, jfk_wav: Path) -> None:
    pcm = bytes(RATE) + pcm24(jfk_wav) + bytes(RATE * 2 * 2)  # 0.5 s, the clip, 2 s silence
    speech_seconds = (len(pcm) - RATE * 4) / (RATE * 2)
    client = openai.AsyncOpenAI(
        api_key="unused-on-a-lan-appliance",
        base_url=f"{server.url}/v1",
        websocket_base_url=server.url.replace("http://", "ws://") + "/v1",
    )
    events: list[tuple[float, Any]] = []
    async with client.beta.realtime.connect(
        model="whisper-1", extra_query={"intent": "transcription"}
    ) as conn:
        await conn.transcription_session.update(
            session={
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
            }
        )

        async def reader() -> None:
            async for event in conn:
                events.append((time.monotonic(), event))

        reading = asyncio.create_task(reader())
        started = time.monotonic()
        for i in range(0, len(pcm), CHUNK):
            await conn.input_audio_buffer.append(audio=b64(pcm[i : i + CHUNK]))
            await asyncio.sleep(max(0.0, started + (i + CHUNK) / (RATE * 2) - time.monotonic()))
        speech_end = started + speech_seconds
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kinds = [e.type for _, e in events]
            stopped = kinds.count("input_audio_buffer.speech_stopped")
            done = kinds.count("conversation.item.input_audio_transcription.completed")
            started_turns = kinds.count("input_audio_buffer.speech_started")
            if stopped and done == stopped == started_turns:
                break
            await asyncio.sleep(0.2)
        reading.cancel()
    kinds = [e.type for _, e in events]
    assert kinds[0] == "transcription_session.created", kinds
    assert "transcription_session.updated" in kinds
    assert "error" not in kinds, [e for _, e in events if e.type == "error"]
    deltas = [(t, e) for t, e in events if e.type.endswith("input_audio_transcription.delta")]
    assert deltas and deltas[0][0] < speech_end, "no delta while the clip was still streaming"
    completed = [e for _, e in events if e.type.endswith("input_audio_transcription.completed")]
    text = " ".join(e.transcript for e in completed if e.transcript)
    assert jiwer.wer(normalize(JFK_TEXT), normalize(text)) <= 0.15, text
    # per item: started, stopped, committed, created, then completed; deltas add up to it
    for item in completed:
        own = [e for _, e in events if getattr(e, "item_id", None) == item.item_id]
        order = [e.type for e in own if not e.type.endswith(".delta")]
        assert order == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
        ], order
        created = [e for _, e in events if e.type == "conversation.item.created"]
        assert any(e.item.id == item.item_id for e in created)
        streamed = "".join(e.delta for e in own if e.type.endswith(".delta"))
        assert item.transcript.startswith(streamed) or not streamed.startswith(item.transcript)
    await assert_healthy(server)
    async with httpx.AsyncClient(base_url=server.url) as http:
        entry = (await http.get("/api/history", params={"limit": 1})).json()["items"][0]
    assert entry["source"] == "realtime"
    assert entry["text"] == text


async def test_manual_commit_without_turn_detection(server: Server, jfk_wav: Path) -> None:
    pcm = pcm24(jfk_wav)
    async with connect(realtime_url(server)) as ws:
        assert (await next_event(ws))["type"] == "transcription_session.created"
        update = {"turn_detection": None, "input_audio_transcription": {"language": "en"}}
        await ws.send(json.dumps({"type": "transcription_session.update", "session": update}))
        updated = await next_event(ws)
        assert updated["type"] == "transcription_session.updated", updated
        assert updated["session"]["turn_detection"] is None
        for i in range(0, len(pcm), CHUNK * 2):  # 200 ms every 100 ms: 2x real time
            await ws.send(
                json.dumps(
                    {"type": "input_audio_buffer.append", "audio": b64(pcm[i : i + CHUNK * 2])}
                )
            )
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c1"}))
        seen: list[dict[str, Any]] = []
        while (
            not seen or seen[-1]["type"] != "conversation.item.input_audio_transcription.completed"
        ):
            seen.append(await next_event(ws))
    kinds = [e["type"] for e in seen]
    assert "input_audio_buffer.speech_started" not in kinds  # no server VAD events
    assert kinds.count("input_audio_buffer.committed") == 1
    assert kinds.count("conversation.item.created") == 1
    completed = seen[-1]
    assert jiwer.wer(normalize(JFK_TEXT), normalize(completed["transcript"])) <= 0.15
    assert completed["usage"]["type"] == "duration"
    await assert_healthy(server)


async def test_bad_events_get_openai_errors_and_the_session_goes_on(server: Server) -> None:
    async with connect(realtime_url(server)) as ws:
        created = await next_event(ws)
        assert created["type"] == "transcription_session.created"
        max_audio = 48_000  # the default LIVE_MAX_FRAME_BYTES (1 s) at 24 kHz
        cases: list[tuple[str | bytes, str, str | None]] = [
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "e1"}),
                "invalid_base64",
                "audio",
            ),
            (json.dumps({"type": "response.create"}), "invalid_value", "type"),
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": 5}),
                "invalid_type",
                "audio",
            ),
            (
                json.dumps(
                    {"type": "input_audio_buffer.append", "audio": b64(bytes(max_audio + 2))}
                ),
                "audio_too_large",
                "audio",
            ),
            (
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(bytes(3))}),
                "invalid_audio",
                "audio",
            ),
            ("x" * 200_000, "event_too_large", None),
            ("{not json", "invalid_json", None),
            ("[" * 100 + "]" * 100, "invalid_json", None),
            (bytes(100), "invalid_event", None),
            (
                json.dumps({"type": "transcription_session.update", "session": {"voice": "x"}}),
                "unknown_parameter",
                "session.voice",
            ),
            (
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {"turn_detection": {"type": "server_vad", "loud": 1}},
                    }
                ),
                "unknown_parameter",
                "session.turn_detection.loud",
            ),
            (
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {"turn_detection": {"type": "semantic_vad"}},
                    }
                ),
                "invalid_value",
                "session.turn_detection.type",
            ),
            (
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {"input_audio_transcription": {"model": "no-such-model"}},
                    }
                ),
                "model_not_found",
                "session.input_audio_transcription.model",
            ),
            (
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {"input_audio_format": "g711_ulaw"},
                    }
                ),
                "invalid_value",
                "session.input_audio_format",
            ),
            (
                json.dumps({"type": "input_audio_buffer.commit"}),
                "input_audio_buffer_commit_empty",
                None,
            ),
        ]
        for message, code, param in cases:
            await ws.send(message)
            error = assert_error_shape(await next_event(ws))
            assert (error["code"], error["param"]) == (code, param), (message[:80], error)
        assert error["event_id"] is None
        await ws.send(
            json.dumps({"type": "input_audio_buffer.append", "audio": "%", "event_id": "evt_7"})
        )
        assert assert_error_shape(await next_event(ws))["event_id"] == "evt_7"
        # the session still works: an update, then audio (silence) and a commit
        await ws.send(
            json.dumps(
                {"type": "transcription_session.update", "session": {"turn_detection": None}}
            )
        )
        assert (await next_event(ws))["type"] == "transcription_session.updated"
        for _ in range(5):
            await ws.send(
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(bytes(CHUNK))})
            )
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        committed = await next_event(ws)
        assert committed["type"] == "input_audio_buffer.committed", committed
        assert (await next_event(ws))["type"] == "conversation.item.created"
        completed = await next_event(ws)
        assert completed["type"] == "conversation.item.input_audio_transcription.completed"
        assert completed["item_id"] == committed["item_id"] and completed["transcript"] == ""
        # the model and language are fixed once audio came
        await ws.send(
            json.dumps(
                {
                    "type": "transcription_session.update",
                    "session": {"input_audio_transcription": {"language": "de"}},
                }
            )
        )
        assert assert_error_shape(await next_event(ws))["code"] == "session_already_started"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert (await next_event(ws))["type"] == "input_audio_buffer.cleared"
    await assert_healthy(server)


async def test_wrong_origin_is_an_error_event_and_1008(server: Server) -> None:
    async with connect(realtime_url(server), origin="http://evil.example") as ws:  # type: ignore[arg-type]
        error = assert_error_shape(json.loads(await ws.recv()))
        assert error["code"] == "origin_not_allowed"
        await ws.wait_closed()
    assert ws.close_code == 1008
    await assert_healthy(server)


async def test_missing_api_key_is_an_error_event(app: Quart) -> None:
    app.extensions["appliance"].runtime.require_api_key = True
    client = app.test_client()
    async with client.websocket("/v1/realtime") as ws:
        error = assert_error_shape(json.loads(await ws.receive()))
        assert error["code"] == "unauthorized"
        assert "API key" in error["message"]
        with pytest.raises(WebsocketDisconnectError) as closed:
            await ws.receive()
        assert closed.value.args[0] == 1008
    async with client.websocket(
        "/v1/realtime", headers={"Authorization": "Bearer wa_bad_key"}
    ) as ws:
        assert assert_error_shape(json.loads(await ws.receive()))["code"] == "unauthorized"
    assert app.extensions["live"].active == 0
    # /ws/live keeps answering 401 on the handshake
    with pytest.raises(Exception) as refused:  # quart's WebsocketResponseError
        async with client.websocket("/ws/live") as ws:
            await ws.receive()
    assert getattr(getattr(refused.value, "response", None), "status_code", None) == 401


async def test_shares_slots_and_idle_limit_with_ws_live(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", live_max_sessions=1, live_idle_timeout=1)
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        async with client.websocket("/ws/live") as live:
            await live.send(json.dumps({"type": "start", "model": "tiny.en"}))
            assert json.loads(await live.receive())["type"] == "ready"
            async with client.websocket("/v1/realtime") as second:
                error = assert_error_shape(json.loads(await second.receive()))
                assert error["code"] == "too_many_sessions"
                with pytest.raises(WebsocketDisconnectError) as closed:
                    await second.receive()
                assert closed.value.args[0] == 1013
            await live.send(json.dumps({"type": "stop"}))
        async with client.websocket("/v1/realtime") as ws:
            created = json.loads(await ws.receive())
            assert created["type"] == "transcription_session.created"
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {}}))
            assert json.loads(await ws.receive())["type"] == "transcription_session.updated"
            # updates are not audio: the idle limit closes the session
            error = assert_error_shape(json.loads(await asyncio.wait_for(ws.receive(), 10)))
            assert error["code"] == "idle_timeout" and "no audio" in error["message"]
            with pytest.raises(WebsocketDisconnectError) as closed:
                await ws.receive()
            assert closed.value.args[0] == 1001
    assert app.extensions["live"].active == 0
