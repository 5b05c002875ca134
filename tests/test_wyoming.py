"""The Wyoming server (Home Assistant speech-to-text) on a real TCP port, driven with the
`wyoming` library's own `AsyncTcpClient` the way Home Assistant's integration drives it."""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from quart import Quart
from wyoming.asr import Transcribe, Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

from appliance.web.app import create_app
from appliance.web.wyoming_server import AudioChunk, AudioStart, AudioStop, WyomingServer
from tests.conftest import make_settings
from tests.wer import wer

pytestmark = pytest.mark.slow


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Quart, WyomingServer]]:
    options: dict[str, Any] = {
        "wyoming_enabled": True,
        "wyoming_port": 0,  # a free port, read back from the server
        "wyoming_zeroconf": False,
        "worker_processes": 1,
    }
    options.update(overrides)
    app = create_app(make_settings(tmp_path / "data", **options))
    async with app.test_app():
        services = app.extensions["appliance"]
        await services.warmed_up()
        server = services.wyoming
        assert server is not None and server.port
        yield app, server


@pytest.fixture
async def wyoming(tmp_path: Path) -> AsyncIterator[tuple[Quart, WyomingServer]]:
    async with running(tmp_path, wyoming_idle_timeout=3) as pair:
        yield pair


def read_pcm(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getsampwidth(), w.getnchannels()) == (2, 1)
        return w.readframes(w.getnframes()), w.getframerate()


async def describe(port: int) -> Info:
    """What Home Assistant does when the integration is set up (`load_wyoming_info`)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None
            if Info.is_type(event.type):
                return Info.from_event(event)


async def transcribe(
    port: int,
    pcm: bytes,
    *,
    rate: int = 16000,
    width: int = 2,
    channels: int = 1,
    chunk_seconds: float = 0.1,
    realtime: bool = False,
) -> tuple[str, list[Event], float]:
    """Home Assistant's `async_process_audio_stream`: transcribe, audio-start, chunks, stop;
    read until `transcript`. Returns the text, every event read, and seconds after audio-stop."""
    step = int(rate * chunk_seconds) * width * channels
    events: list[Event] = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), step)):
            chunk = AudioChunk(rate, width, channels, pcm[offset : offset + step])
            await client.write_event(chunk.event())
            if realtime:
                delay = started + (index + 1) * chunk_seconds - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        await client.write_event(AudioStop().event())
        stopped = time.monotonic()
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None, "the server closed the connection"
            events.append(event)
            if Transcript.is_type(event.type):
                latency = time.monotonic() - stopped
                text = Transcript.from_event(event).text
                break
        # a client of protocol >= 1.7 also gets transcript-stop after the transcript
        if any(e.type == "transcript-start" for e in events):
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None
            events.append(event)
    return text, events, latency


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> list[dict[str, Any]]:
    """Send raw bytes, read what comes back until the server closes; the events' headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout)  # until EOF: a clean close
    except ConnectionResetError:  # closed with our bytes unread: refused
        return []
    finally:
        writer.close()
    events = []
    lines = iter(received.split(b"\n"))
    for line in lines:
        if not line.strip():
            continue
        header = json.loads(line)
        if header.get("data_length"):
            header["data"] = json.loads(next(lines))
        events.append(header)
    return events


async def assert_healthy(server: WyomingServer) -> None:
    info = await describe(server.port or 0)
    assert info.asr and info.asr[0].models
    for _ in range(50):
        if len(server.connections) == 0:
            break
        await asyncio.sleep(0.1)
    assert len(server.connections) == 0


async def test_describe_lists_installed_models_and_languages(
    wyoming: tuple[Quart, WyomingServer],
) -> None:
    _, server = wyoming
    info = await describe(server.port or 0)
    program = info.asr[0]
    assert program.name == "whisper-appliance" and program.installed
    assert program.supports_transcript_streaming
    models = {m.name: m for m in program.models}
    assert program.models[0].name == "tiny.en"  # the default model first
    assert models["tiny.en"].languages == ["en"]
    assert "base" in models and "de" in models["base"].languages  # bundled, multilingual


async def test_transcribe_real_time_and_at_once_land_in_history(
    wyoming: tuple[Quart, WyomingServer], jfk_wav: Path
) -> None:
    from tests.conftest import JFK_TEXT

    app, server = wyoming
    pcm, _ = read_pcm(jfk_wav)
    # a satellite: 16 kHz mono, 100 ms chunks at real-time pace (decoded while it arrives)
    text, events, latency = await transcribe(server.port or 0, pcm, realtime=True)
    assert wer(JFK_TEXT, text) <= 0.15, text
    kinds = [e.type for e in events]
    assert kinds == ["transcript-start", "transcript-chunk", "transcript", "transcript-stop"]
    assert latency < 5
    # a file sent at once, as 48 kHz stereo: converted, then a job of the queue
    mono = np.frombuffer(pcm, dtype="<i2")
    up = np.repeat(mono, 3)  # 48 kHz
    stereo = np.stack([up, up], axis=1).astype("<i2").tobytes()
    text2, _, _ = await transcribe(server.port or 0, stereo, rate=48000, channels=2)
    assert wer(JFK_TEXT, text2) <= 0.15, text2
    history = app.extensions["appliance"].history
    rows, _ = await history.list(limit=10)
    sources = [r["source"] for r in rows]
    assert sources.count("wyoming") == 2, rows
    leftovers = list((server.settings.tmp_dir).glob("wyoming-*"))
    assert leftovers == []
    await assert_healthy(server)
    # both requests, and assert_healthy's describe, are counted for /metrics
    registry = app.extensions["appliance"].models.metrics.registry
    counted = {
        kind: registry.get_sample_value(
            "whisper_wyoming_requests_total", {"kind": kind, "outcome": "ok"}
        )
        for kind in ("transcribe", "describe")
    }
    assert counted == {"transcribe": 2.0, "describe": 1.0}


async def test_refuses_clients_outside_the_allowed_networks(tmp_path: Path) -> None:
    import ipaddress

    async with running(
        tmp_path, wyoming_allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),)
    ) as (_, server):
        events = await raw_exchange(server.port or 0, Describe().event().type.encode())
        assert events == []  # closed without a word
        with pytest.raises((ConnectionError, AssertionError, asyncio.IncompleteReadError)):
            await describe(server.port or 0)
        assert server.refused >= 2


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"this is not json\n", "invalid_event"),
        (b'["type", "describe"]\n', "invalid_event"),
        (b'{"type": "audio-chunk", "payload_length": 4194304}\n', "event_too_large"),
        (b'{"type": "describe", "data_length": 10000000}\n', "event_too_large"),
        (b'{"type": "audio-chunk", "payload_length": -1}\n', "invalid_event"),
        (b'{"type": "x", "data": "' + b"a" * 70000, "event_too_large"),
        (b'{"type": "audio-start", "data": {"rate": 0, "width": 2, "channels": 1}}\n', None),
        (b'{"type": "audio-stop"}\n', "unexpected_event"),
        (b'{"type": "describe", "data_length": 5}\n{"a"', "truncated_event"),
    ],
)
async def test_malformed_events_get_an_error_and_a_clean_close(
    wyoming: tuple[Quart, WyomingServer], data: bytes, code: str | None
) -> None:
    _, server = wyoming
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    if code == "truncated_event":
        writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    header = json.loads(received.split(b"\n")[0])
    assert header["type"] == "error"
    body = json.loads(received.split(b"\n", 1)[1][: header["data_length"]])
    assert body["code"] == (code or "invalid_audio")
    await assert_healthy(server)


async def test_oversized_chunk_inside_a_request_closes(
    wyoming: tuple[Quart, WyomingServer], tmp_path: Path
) -> None:
    _, server = wyoming
    start = AudioStart(rate=16000, width=2, channels=1).event()
    header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}}
    header["payload_length"] = 2 * 1024 * 1024
    data = json.dumps({"type": start.type, "data": start.data}).encode() + b"\n"
    data += json.dumps(header).encode() + b"\n" + b"\0" * 1000
    events = await raw_exchange(server.port or 0, data)
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["data"]["code"] == "event_too_large"
    await assert_healthy(server)
    assert list(server.settings.tmp_dir.glob("wyoming-*")) == []


async def test_client_that_never_sends_audio_stop_is_closed(
    wyoming: tuple[Quart, WyomingServer], jfk_wav: Path
) -> None:
    _, server = wyoming
    pcm, _ = read_pcm(jfk_wav)
    async with AsyncTcpClient("127.0.0.1", server.port or 0) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(16000, 2, 1, pcm[:32000]).event())
        started = time.monotonic()
        event = await asyncio.wait_for(client.read_event(), 20)  # idle timeout: 3 s
        assert event is not None and event.type == "error"
        assert event.data["code"] == "idle_timeout"
        assert 2 <= time.monotonic() - started < 15
        assert await asyncio.wait_for(client.read_event(), 10) is None  # then closed
    await assert_healthy(server)
    assert list(server.settings.tmp_dir.glob("wyoming-*")) == []


async def test_audio_over_the_duration_limit_closes(tmp_path: Path, jfk_wav: Path) -> None:
    pcm, _ = read_pcm(jfk_wav)
    async with running(tmp_path, max_audio_duration=2) as (_, server):
        data = b""
        for event in (
            AudioStart(rate=16000, width=2, channels=1).event(),
            AudioChunk(16000, 2, 1, pcm[: 3 * 32000]).event(),
            AudioStop().event(),
        ):
            header: dict[str, Any] = {"type": event.type}
            body = json.dumps(event.data).encode()
            header["data_length"] = len(body)
            if event.payload:
                header["payload_length"] = len(event.payload)
            data += json.dumps(header).encode() + b"\n" + body + (event.payload or b"")
        events = await raw_exchange(server.port or 0, data)
        assert [e["type"] for e in events] == ["error"]
        assert events[0]["data"]["code"] == "audio_too_long"
        await assert_healthy(server)
        registry = server.services.models.metrics.registry
        labels = {"kind": "transcribe", "outcome": "audio_too_long"}
        assert registry.get_sample_value("whisper_wyoming_requests_total", labels) == 1.0
        errors = {"component": "wyoming", "code": "audio_too_long"}
        assert registry.get_sample_value("whisper_errors_total", errors) == 1.0


async def test_too_many_connections_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, wyoming_max_connections=1) as (_, server):
        first = AsyncTcpClient("127.0.0.1", server.port or 0)
        await first.connect()
        try:
            await first.write_event(Describe().event())
            assert await asyncio.wait_for(first.read_event(), 10) is not None
            events = await raw_exchange(server.port or 0, b"")
            assert events and events[0]["data"]["code"] == "too_many_connections"
        finally:
            await first.disconnect()
        await assert_healthy(server)


async def test_zeroconf_announces_wyoming(tmp_path: Path) -> None:
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    async with running(tmp_path, wyoming_zeroconf=True) as (_, server):
        found: asyncio.Queue[str] = asyncio.Queue()

        def on_change(
            zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Added:
                found.put_nowait(name)

        try:
            browser_zc = AsyncZeroconf()
        except OSError as exc:
            pytest.skip(f"no multicast socket on this host: {exc}")
        browser = AsyncServiceBrowser(
            browser_zc.zeroconf, "_wyoming._tcp.local.", handlers=[on_change]
        )
        try:
            deadline = time.monotonic() + 20
            ours = None
            while ours is None and time.monotonic() < deadline:
                try:
                    name = await asyncio.wait_for(found.get(), deadline - time.monotonic())
                except TimeoutError:
                    break
                if name.startswith("whisper-appliance-"):
                    ours = name
            assert ours is not None, "_wyoming._tcp.local. not found by a zeroconf browser"
            info = AsyncServiceInfo("_wyoming._tcp.local.", ours)
            assert await info.async_request(browser_zc.zeroconf, 5000)
            assert info.port == server.port
        finally:
            await browser.async_cancel()
            await browser_zc.async_close()


async def test_ping_and_unknown_events_keep_the_connection(
    wyoming: tuple[Quart, WyomingServer],
) -> None:
    from wyoming.ping import Ping

    _, server = wyoming
    async with AsyncTcpClient("127.0.0.1", server.port or 0) as client:
        await client.write_event(Ping(text="hi").event())
        pong = await asyncio.wait_for(client.read_event(), 10)
        assert pong is not None and pong.type == "pong" and pong.data["text"] == "hi"
        await client.write_event(Event(type="synthesize", data={"text": "not ours"}))
        await client.write_event(Describe().event())
        event = await asyncio.wait_for(client.read_event(), 10)
        assert event is not None and Info.is_type(event.type)


async def test_off_by_default_and_a_busy_port_does_not_stop_the_appliance(
    tmp_path: Path, app: Quart
) -> None:
    import socket

    assert app.extensions["appliance"].wyoming is None  # WYOMING_ENABLED=false
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = {"wyoming_enabled": True, "wyoming_port": port, "wyoming_zeroconf": False}
        busy = create_app(make_settings(tmp_path / "busy", **options))
        async with busy.test_app():
            services = busy.extensions["appliance"]
            assert services.wyoming is None
            response = await busy.test_client().get("/health")
            assert response.status_code in (200, 503)  # serving; readiness is the model's


async def test_more_live_requests_than_workers_go_through_the_queue(
    tmp_path: Path, jfk_wav: Path
) -> None:
    pcm, _ = read_pcm(jfk_wav)
    async with running(tmp_path) as (app, server):  # one worker: one live decode at a time
        async with AsyncTcpClient("127.0.0.1", server.port or 0) as first:
            await first.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await first.write_event(AudioChunk(16000, 2, 1, pcm[:16000]).event())
            for _ in range(50):
                if server.live_requests == 1:
                    break
                await asyncio.sleep(0.1)
            assert server.live_requests == 1
            # meanwhile, a second request at real-time pace (3 s: "And so my fellow Americans")
            jobs = app.extensions["appliance"].jobs
            assert not [j for j in jobs.jobs.values() if j.source == "wyoming"]
            text, _, _ = await transcribe(server.port or 0, pcm[: 3 * 32000], realtime=True)
            assert "fellow americans" in text.lower(), text
            assert [j for j in jobs.jobs.values() if j.source == "wyoming"]  # it was a job
            await first.write_event(AudioStop().event())
            while True:
                event = await asyncio.wait_for(first.read_event(), 60)
                assert event is not None
                if Transcript.is_type(event.type):
                    break
        await assert_healthy(server)
        assert server.live_requests == 0
