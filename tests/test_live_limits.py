"""Live slots are given back (issue 12, finding 5), against a real server (Hypercorn).

`LIVE_MAX_MINUTES` is wall-clock time from connecting, whatever the client sends; only audio
keeps a session from the idle limit (pings do not); and a frame over the limit but under
Hypercorn's transport bound gets the app's `frame_too_large` message before the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart.testing.connections import WebsocketDisconnectError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from appliance.system.config import ConfigError, Settings
from appliance.web.app import create_app
from appliance.web.server import WEBSOCKET_MAX_MESSAGE, hypercorn_config
from tests.conftest import Server, make_settings, start_server, stop_server
from tests.test_ws_live import assert_healthy, closed_with, start, ws_url

IDLE_SECONDS = 2
MAX_MINUTES = 0.1  # 6 s of wall-clock time per session
SESSIONS = 4


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "LIVE_IDLE_TIMEOUT": str(IDLE_SECONDS),
        "LIVE_MAX_MINUTES": str(MAX_MINUTES),
        "LIVE_MAX_SESSIONS": str(SESSIONS),
    }
    srv = start_server(tmp_path_factory.mktemp("live-limits") / "data", env=env)
    yield srv
    stop_server(srv)


async def live_sessions(server: Server) -> int:
    async with httpx.AsyncClient(base_url=server.url) as http:
        return int((await http.get("/api/live")).json()["sessions"])


async def pinger(ws: ClientConnection) -> tuple[list[dict[str, Any]], int, str]:
    """Start a session, then send nothing but pings (every 0.3 s) until the server closes."""
    await start(ws)
    messages: list[dict[str, Any]] = []

    async def ping() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(json.dumps({"type": "ping"}))
                await asyncio.sleep(0.3)

    pinging = asyncio.create_task(ping())
    try:
        # bounded: a slot held by pings would stay held; the server must close first
        messages, code, reason = await closed_with(ws, timeout=IDLE_SECONDS + 15)
    finally:
        pinging.cancel()
    return messages, code, reason


async def test_ping_only_clients_are_closed_idle_and_free_their_slots(
    limited_server: Server,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(connect(ws_url(limited_server)))
            for _ in range(SESSIONS)
        ]
        pingers = [asyncio.create_task(pinger(ws)) for ws in sockets]
        while await live_sessions(limited_server) < SESSIONS:
            await asyncio.sleep(0.05)
        # every slot is taken: a fifth client is refused for now
        async with connect(ws_url(limited_server)) as fifth:
            messages, code, _ = await closed_with(fifth)
        assert code == 1013 and messages[0]["code"] == "too_many_sessions"
        # pongs come back, but pings are not activity: the idle limit closes every pinger
        for messages, code, reason in await asyncio.gather(*pingers):
            assert (code, reason) == (1001, "idle timeout"), messages
            assert any(m["type"] == "pong" for m in messages)
            errors = [m for m in messages if m["type"] == "error"]
            assert errors and errors[0]["code"] == "idle_timeout", messages
            assert "pings do not count" in errors[0]["message"]
            assert messages[-1]["type"] == "end"
    await assert_healthy(limited_server)
    # and the slots are free again: a fifth client gets a session
    async with connect(ws_url(limited_server)) as fifth:
        await start(fifth)
        await fifth.send(json.dumps({"type": "stop"}))
        messages, code, _ = await closed_with(fifth)
    assert code == 1000 and messages[-1]["type"] == "end"


async def test_wall_clock_limit_ends_a_session_streaming_slower_than_real_time(
    limited_server: Server,
) -> None:
    async with connect(ws_url(limited_server)) as ws:
        connected = time.monotonic()
        ready = await start(ws)
        assert ready["limits"]["max_session_minutes"] == MAX_MINUTES

        async def trickle() -> None:  # 100 ms of audio every 0.5 s: a fifth of real time
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.send(bytes(3200))
                    await asyncio.sleep(0.5)

        feeding = asyncio.create_task(trickle())
        try:
            messages, code, reason = await closed_with(ws, timeout=MAX_MINUTES * 60 + 15)
        finally:
            feeding.cancel()
        elapsed = time.monotonic() - connected
    # the audio received (about 1.2 s) is far below the limit: wall-clock time ended it
    assert (code, reason) == (1000, "maximum session length reached"), messages
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["session_limit"], messages
    assert messages[-1]["type"] == "end"
    assert messages[-1]["reason"] == "maximum session length reached"
    assert messages[-1]["duration"] < MAX_MINUTES * 60 / 2
    assert MAX_MINUTES * 60 - 0.5 <= elapsed <= MAX_MINUTES * 60 + 10
    await assert_healthy(limited_server)


@pytest.mark.parametrize("started", [False, True])
async def test_wall_clock_limit_ends_a_silent_client(tmp_path: Path, started: bool) -> None:
    """A client that sends nothing at all, before or after `start`: with an idle limit longer
    than the session limit, the session limit ends it (in-process, no Hypercorn needed)."""
    settings = make_settings(tmp_path / "data", live_idle_timeout=60, live_max_minutes=0.05)
    app = create_app(settings)
    async with app.test_app():
        await app.extensions["appliance"].warmed_up()
        async with app.test_client().websocket("/ws/live") as ws:
            connected = time.monotonic()
            if started:
                await ws.send(json.dumps({"type": "start", "model": "tiny.en"}))
                assert json.loads(await ws.receive())["type"] == "ready"
            error = json.loads(await asyncio.wait_for(ws.receive(), 20))
            elapsed = time.monotonic() - connected
            assert error["type"] == "error" and error["code"] == "session_limit", error
            if started:
                end = json.loads(await ws.receive())
                assert end["type"] == "end" and end["reason"] == "maximum session length reached"
            with pytest.raises(WebsocketDisconnectError) as closed:
                await ws.receive()
            assert closed.value.args[0] == 1000
        assert 2.5 <= elapsed <= 10
        assert app.extensions["live"].active == 0


async def test_two_mib_audio_frame_gets_the_error_before_the_close(
    limited_server: Server,
) -> None:
    async with connect(ws_url(limited_server)) as ws:
        await start(ws)
        await ws.send(bytes(2 * 1024 * 1024))
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1009, "frame too large")
    assert messages[0]["type"] == "error" and messages[0]["code"] == "frame_too_large", messages
    assert "2097152" in messages[0]["message"]
    assert messages[-1]["type"] == "end"
    await assert_healthy(limited_server)


async def test_two_mib_text_frame_gets_the_error_before_the_close(
    limited_server: Server,
) -> None:
    async with connect(ws_url(limited_server)) as ws:
        await ws.send("x" * (2 * 1024 * 1024))
        messages, code, reason = await closed_with(ws)
    assert (code, reason) == (1009, "too large")
    assert messages == [messages[0]] and messages[0]["code"] == "frame_too_large", messages
    await assert_healthy(limited_server)


def test_transport_bound_is_above_the_app_limit_and_finite(tmp_path: Path) -> None:
    config = hypercorn_config(make_settings(tmp_path / "data"))
    largest_frame = make_settings(tmp_path / "data", live_max_frame_bytes=1024 * 1024)
    assert config.websocket_max_message_size == WEBSOCKET_MAX_MESSAGE
    assert largest_frame.live_max_frame_bytes < WEBSOCKET_MAX_MESSAGE <= 16 * 1024 * 1024
    with pytest.raises(ConfigError):  # the setting cannot go past the transport bound
        Settings.from_env({"LIVE_MAX_FRAME_BYTES": str(WEBSOCKET_MAX_MESSAGE)})


@pytest.mark.parametrize(
    ("text", "minutes"), [("60", 60), ("0", 0), ("0.5", 0.5), (" 1440 ", 1440)]
)
def test_live_max_minutes_accepts_fractions(text: str, minutes: float) -> None:
    value = Settings.from_env({"LIVE_MAX_MINUTES": text}).live_max_minutes
    assert value == minutes and type(value) is type(minutes)


@pytest.mark.parametrize("text", ["-1", "1441", "nan", "inf", "abc", ""])
def test_live_max_minutes_refuses_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="LIVE_MAX_MINUTES"):
        Settings.from_env({"LIVE_MAX_MINUTES": text})
