"""The /ws/live protocol against a real server (Hypercorn), without a browser.

Every refusal gives an `error` message and then the documented close code; afterwards the
server is healthy and holds no live session.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jiwer
import pytest
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from appliance.web.app import create_app
from tests.conftest import JFK_TEXT, Server, make_settings

CHUNK = 6400  # bytes: 200 ms of 16 kHz s16le


def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/ws/live"


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c in " '").split())


async def closed_with(
    ws: ClientConnection, timeout: float = 30
) -> tuple[list[dict[str, Any]], int, str]:
    """Read messages until the server closes; return them with the close code and reason."""
    messages: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            async for raw in ws:
                messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    return messages, ws.close_code, ws.close_reason or ""


async def start(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "start", "model": "tiny.en", "language": "en", **fields}))
    ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert ready["type"] == "ready", ready
    return ready


async def assert_healthy(server: Server) -> None:
    """The server answers and, once cleanup ran, holds no live session."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        deadline = time.monotonic() + 20
        while True:
            status = (await http.get("/api/live")).json()
            if status["sessions"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status["sessions"] == 0
        assert (await http.get("/health")).status_code == 200
        models = (await http.get("/api/models")).json()["models"]
        assert all(m["in_use"] == 0 for m in models), "a live session still holds its model"


async def test_session_streams_partials_and_finals_and_saves_history(
    server: Server, jfk_wav: Path
) -> None:
    pcm = bytes(16000) + read_pcm(jfk_wav) + bytes(32000)
    origin = server.url  # a browser on the appliance's own page
    async with connect(ws_url(server), origin=origin) as ws:  # type: ignore[arg-type]
        ready = await start(ws)
        assert ready["sample_rate"] == 16000
        assert ready["limits"]["max_frame_bytes"] >= CHUNK
        messages: list[dict[str, Any]] = []

        async def reader() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        reading = asyncio.create_task(reader())
        sent_at_end = 0.0
        for i in range(0, len(pcm), CHUNK):
            await ws.send(pcm[i : i + CHUNK])
            await asyncio.sleep(0.1)  # 2x real time: inside the 64 kB/s limit
        sent_at_end = time.monotonic()
        first_partial = next((m for m in messages if m["type"] == "partial"), None)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reading, 60)
    assert first_partial is not None, "no partial while audio was still streaming"
    assert sent_at_end
    assert ws.close_code == 1000
    finals = [m for m in messages if m["type"] == "final"]
    text = " ".join(f["text"] for f in finals)
    assert jiwer.wer(normalize(JFK_TEXT), normalize(text)) <= 0.15, text
    assert all("latency_ms" in f and "processing_ms" in f for f in finals)
    end = messages[-1]
    assert end["type"] == "end" and end["history_id"], end
    assert end["text"] == text
    async with httpx.AsyncClient(base_url=server.url) as http:
        entry = (await http.get(f"/api/history/{end['history_id']}")).json()
    assert entry["source"] == "live"
    assert entry["text"] == text
    assert len(entry["segments"]) == len(finals)
    await assert_healthy(server)


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
async def test_wrong_origin_closes_1008(server: Server, origin: str) -> None:
    async with connect(ws_url(server), origin=origin) as ws:  # type: ignore[arg-type]
        messages, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason == "origin not allowed"
    assert messages == [messages[0]] and messages[0]["code"] == "origin_not_allowed"
    await assert_healthy(server)


async def test_binary_before_start_closes_1003(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        await ws.send(bytes(CHUNK))
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1003, "audio before start")
    assert messages[0]["type"] == "error" and messages[0]["code"] == "unexpected_audio"
    await assert_healthy(server)


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"no": "type"}', "x" * 10_000])
async def test_garbage_json_closes(server: Server, garbage: str) -> None:
    async with connect(ws_url(server)) as ws:
        await ws.send(garbage)
        messages, code, _ = await closed_with(ws)
    assert code == (1009 if len(garbage) > 4096 else 1007)
    assert messages[0]["type"] == "error"
    await assert_healthy(server)


async def test_garbage_during_session_closes_1007(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        await start(ws)
        await ws.send(bytes(CHUNK))
        await ws.send("}{")
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1007, "malformed JSON")
    assert [m["type"] for m in messages][-2:] == ["error", "end"]
    await assert_healthy(server)


async def test_invalid_start_closes_1008(server: Server) -> None:
    for fields, error in (
        ({"model": "no-such-model"}, "model_not_found"),
        ({"language": "xx"}, "invalid_language"),
        ({"sample_rate": 48000}, "invalid_sample_rate"),
    ):
        async with connect(ws_url(server)) as ws:
            await ws.send(json.dumps({"type": "start", **fields}))
            messages, code, _ = await closed_with(ws)
        assert code == 1008
        assert messages[0]["code"] == error, messages
    await assert_healthy(server)


async def test_oversized_frame_closes_1009(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        ready = await start(ws)
        await ws.send(bytes(ready["limits"]["max_frame_bytes"] + 2))
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1009, "frame too large")
    assert messages[0]["code"] == "frame_too_large"
    await assert_healthy(server)


async def test_flood_closes_1008_with_reason(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        ready = await start(ws)
        rate = ready["limits"]["max_bytes_per_second"]
        try:
            for _ in range(400):  # 5x real time; paced so the close frame is not lost to a
                await ws.send(bytes(16000))  # TCP reset while the client is still sending
                await asyncio.sleep(0.05)
        except ConnectionClosed:
            pass
        messages, code, reason = await closed_with(ws)
    assert code == 1008
    assert reason == f"more than {rate} bytes/s"
    assert any(m.get("code") == "rate_limited" for m in messages)
    await assert_healthy(server)


async def test_abrupt_disconnect_mid_utterance_frees_the_session(
    server: Server, jfk_wav: Path
) -> None:
    pcm = read_pcm(jfk_wav)[: 16000 * 2 * 4]  # stop in the middle of "ask not"
    async with httpx.AsyncClient(base_url=server.url) as http:
        before = (await http.get("/api/history")).json()["total"]
    ws = await connect(ws_url(server))
    await start(ws)
    for i in range(0, len(pcm), CHUNK):
        await ws.send(pcm[i : i + CHUNK])
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/api/live")).json()["sessions"] >= 1
    ws.transport.abort()  # no close frame: the TCP connection just goes away
    await assert_healthy(server)
    # what was said before the connection dropped is in the history
    async with httpx.AsyncClient(base_url=server.url) as http:
        page = (await http.get("/api/history")).json()
    assert page["total"] == before + 1
    assert page["items"][0]["source"] == "live"
    assert "fellow americans" in normalize(page["items"][0]["text"])
    # and the next session works
    async with connect(ws_url(server)) as again:
        await start(again)
        await again.send(json.dumps({"type": "stop"}))
        messages, code, _ = await closed_with(again)
    assert code == 1000 and messages[-1]["type"] == "end"


# --- limits that need their own settings: the in-process test client --------------------------


@pytest.fixture
async def limited_app(tmp_path: Path) -> AsyncIterator[Quart]:
    settings = make_settings(tmp_path / "data", live_max_sessions=1, live_idle_timeout=1)
    app = create_app(settings)
    async with app.test_app():
        await app.extensions["appliance"].warmed_up()
        yield app


async def test_too_many_sessions_and_idle_timeout(limited_app: Quart) -> None:
    client = limited_app.test_client()
    async with client.websocket("/ws/live") as first:
        await first.send(json.dumps({"type": "start", "model": "tiny.en"}))
        assert json.loads(await first.receive())["type"] == "ready"
        async with client.websocket("/ws/live") as second:
            refusal = json.loads(await second.receive())
            assert refusal["code"] == "too_many_sessions"
            with pytest.raises(WebsocketDisconnectError) as closed:
                await second.receive()
            assert closed.value.args[0] == 1013
        # the first session sends nothing more: the idle timeout closes it
        error = json.loads(await asyncio.wait_for(first.receive(), 10))
        assert error["code"] == "idle_timeout"
        assert json.loads(await first.receive())["type"] == "end"
        with pytest.raises(WebsocketDisconnectError) as closed:
            await first.receive()
        assert closed.value.args[0] == 1001
    assert limited_app.extensions["live"].active == 0


async def test_same_origin_and_allowed_origins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", allowed_origins=("https://app.example",))
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        for origin, ok in (
            ("http://localhost", True),
            ("https://app.example", True),
            ("https://app.example.evil", False),
        ):
            async with client.websocket("/ws/live", headers={"Origin": origin}) as ws:
                await ws.send(json.dumps({"type": "start", "model": "tiny.en"}))
                first = json.loads(await ws.receive())
                assert (first["type"] == "ready") is ok, (origin, first)
                if ok:
                    await ws.send(json.dumps({"type": "stop"}))
                    assert json.loads(await ws.receive())["type"] == "end"
                with pytest.raises(WebsocketDisconnectError) as closed:
                    await ws.receive()
                assert closed.value.args[0] == (1000 if ok else 1008)
