"""Wyoming protocol server: speech-to-text for Home Assistant (Assist) and other Wyoming clients.

A TCP listener on `WYOMING_PORT` speaking the protocol of the `wyoming` library (the one Home
Assistant's integration uses): `describe` -> `info` (an `asr` program listing the installed
models and their languages); `transcribe`, `audio-start`, `audio-chunk`*, `audio-stop` ->
`transcript` (preceded by `transcript-start` / `transcript-chunk` and followed by
`transcript-stop` for clients of protocol 1.7 or later, which know the streaming events).
Any sample rate, width and channel count is converted to 16 kHz mono 16-bit as it arrives.

Two ways to the text, both on the appliance's model manager, both saved to the history with
source `wyoming`:

- audio that arrives at about real time (a satellite streaming its microphone) is decoded
  *while it arrives* by the live-speech core (`LiveSession`: Silero VAD, speculative finals),
  so when `audio-stop` comes only the last words are left to decode;
- audio that arrives faster than real time (a file sent at once) is a job of the job queue,
  like an upload: same workers, same queue bound (`queue_full` when it is full); so is a
  request that starts while as many requests as there are workers are decoded live.

Wyoming has no authentication: peers outside `WYOMING_ALLOWED_NETWORKS` are closed at once.
Everything a client sends is bounded: the header line, its data and payload, the audio of one
request (`MAX_AUDIO_DURATION`), the time without audio (`WYOMING_IDLE_TIMEOUT`) and the
connections at once (`WYOMING_MAX_CONNECTIONS`). A protocol error gets an `error` event and
the connection is closed; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import time
import warnings
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from appliance import __version__
from appliance.core.engines.base import SAMPLE_RATE, TranscribeOptions
from appliance.core.jobs import Job, JobStoreError, QueueFullError
from appliance.core.live.decoder import Decoder
from appliance.core.live.session import BacklogError, LiveConfig, LiveSession, LiveTranscriber
from appliance.core.model_manager import CATALOGUE, ModelError
from appliance.web.api.options import LANGUAGES
from appliance.web.metrics import wyoming_request
from appliance.web.services import Services

with warnings.catch_warnings():  # wyoming.audio imports audioop (deprecated in 3.11, works)
    warnings.simplefilter("ignore", DeprecationWarning)
    from wyoming.asr import (
        Transcribe,
        Transcript,
        TranscriptChunk,
        TranscriptStart,
        TranscriptStop,
    )
    from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
    from wyoming.error import Error
    from wyoming.event import Event, async_write_event
    from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
    from wyoming.ping import Ping, Pong

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
MAX_HEADER_BYTES = 64 * 1024  # one JSON line
MAX_DATA_BYTES = 64 * 1024  # the data block after the header
MAX_PAYLOAD_BYTES = 1024 * 1024  # one audio chunk (1 s of 48 kHz stereo 32-bit is 384 KB)
STREAMING_SINCE = (1, 7)  # protocol version that added transcript-start/-chunk/-stop
# Audio arriving faster than this (audio seconds per wall second, after a head start for a
# satellite's pre-buffer) is "sent at once": a job of the queue instead of a live decode.
REALTIME_PACE = 1.5
PACE_HEAD_START = 2.0
FLUSH_TIMEOUT = 60.0  # decoding the rest of a live request after audio-stop, at most
RATES = (1000, 192_000)
WIDTHS = (1, 2, 3, 4)
MAX_CHANNELS = 8


class ProtocolError(Exception):
    """The client broke the protocol or a limit: an `error` event, then the connection closes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestFailedError(Exception):
    """One transcription could not be done; the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _version(text: Any) -> tuple[int, ...]:
    if not isinstance(text, str):
        return ()
    parts = []
    for part in text.split(".")[:3]:
        match = re.match(r"\d+", part)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


async def read_event(
    reader: asyncio.StreamReader, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[Event, tuple[int, ...]] | None:
    """One event with bounded sizes, and the protocol version its header names; None at EOF.

    The header line is bounded by the reader's limit (MAX_HEADER_BYTES), the data block and
    the payload by the constants here: a larger length closes the connection before a byte of
    it is read.
    """
    try:
        line = await reader.readline()
    except ValueError:  # asyncio: the line is longer than the reader's limit
        raise ProtocolError("event_too_large", "an event header is over 64 KiB") from None
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise ProtocolError("truncated_event", "the connection ended inside an event header")
    try:
        header = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("invalid_event", "an event header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("invalid_event", "an event header must be an object with a type")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "event data must be an object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", max_payload)
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise ProtocolError("invalid_event", "event data must be an object")
            data.update(extra)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise ProtocolError("truncated_event", "the connection ended inside an event") from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("invalid_event", "event data is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload), _version(header.get("version"))


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("invalid_event", f"{key} must be a whole number of bytes")
    if value > limit:
        raise ProtocolError("event_too_large", f"{key} {value} is over the limit of {limit}")
    return value


def peer_allowed(peer: Any, networks: tuple[Any, ...]) -> bool:
    """Whether a socket peer (`peername` tuple) is inside one of the allowed networks."""
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def _audio_format(rate: Any, width: Any, channels: Any) -> tuple[int, int, int]:
    for name, value in (("rate", rate), ("width", width), ("channels", channels)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError("invalid_audio", f"audio {name} must be a whole number")
    if not RATES[0] <= rate <= RATES[1]:
        raise ProtocolError("invalid_audio", f"sample rate {rate} is not supported")
    if width not in WIDTHS:
        raise ProtocolError("invalid_audio", f"sample width {width} is not 1, 2, 3 or 4 bytes")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError("invalid_audio", f"{channels} channels are not supported")
    return rate, width, channels


@dataclass
class Request:
    """One transcription: the audio of one audio-start ... audio-stop."""

    model: str
    language: str | None
    rate: int
    width: int
    channels: int
    wav_path: Path
    wav: wave.Wave_write
    converter: AudioChunkConverter
    started: float = field(default_factory=time.monotonic)
    samples: int = 0
    batch: bool = False
    live: bool = False
    session: LiveSession | None = None
    core: LiveTranscriber | None = None
    runner: asyncio.Task[None] | None = None
    holds_model: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


class WyomingServer:
    """The TCP listener, its connections and the zeroconf announcement."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[Any]] = set()
        self.requests = 0
        self.live_requests = 0  # requests decoded while their audio arrives
        self.refused = 0
        self._zeroconf: Any = None
        self._announce: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        if self.server is None or not self.server.sockets:
            return None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        s = self.settings
        self.server = await asyncio.start_server(
            self._connection,
            s.bind_address or None,  # BIND_ADDRESS, like the HTTP listener
            s.wyoming_port,
            limit=MAX_HEADER_BYTES,
            reuse_address=True,
        )
        log.info("Wyoming server listening on %s port %s", s.bind_address, self.port)
        outside = [a for a in self._addresses() if not peer_allowed((a,), self._networks())]
        if outside:
            log.warning(
                "Wyoming: %s not in WYOMING_ALLOWED_NETWORKS: clients on that network are "
                "refused unless it is added",
                ", ".join(outside),
            )
        if s.wyoming_zeroconf:
            self._announce = asyncio.create_task(self._register_zeroconf())

    async def stop(self) -> None:
        if self._announce is not None:
            self._announce.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._announce
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf.async_unregister_all_services()
                await self._zeroconf.async_close()
            self._zeroconf = None
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=FLUSH_TIMEOUT)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "connections": len(self.connections),
            "requests": self.requests,
            "live_requests": self.live_requests,
            "refused": self.refused,
            "zeroconf": self._zeroconf is not None,
        }

    # --- zeroconf ------------------------------------------------------------------------------
    def _addresses(self) -> list[str]:
        """Addresses to announce: BIND_ADDRESS, or every address of the machine the listener
        accepts that is not loopback or link-local (those in WYOMING_ALLOWED_NETWORKS first)."""
        bound = self.settings.bind_address
        if bound not in ("0.0.0.0", "::", ""):  # noqa: S104
            return [bound]
        families = {"0.0.0.0": {socket.AF_INET}, "::": {socket.AF_INET6}}.get(  # noqa: S104
            bound, {socket.AF_INET, socket.AF_INET6}
        )  # what the listener accepts (asyncio binds "::" IPv6-only)
        found: list[tuple[int, int, str]] = []
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family not in families:
                    continue
                try:
                    ip = ipaddress.ip_address(addr.address.split("%", 1)[0])
                except ValueError:
                    continue
                if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                    continue
                allowed = peer_allowed((str(ip),), self._networks())
                found.append((0 if allowed else 1, ip.version, str(ip)))
        return [address for _, _, address in sorted(found)] or ["127.0.0.1"]

    def _networks(self) -> tuple[Any, ...]:
        return tuple(self.settings.wyoming_allowed_networks)

    async def _register_zeroconf(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "appliance"
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"whisper-appliance-{host}.{SERVICE_TYPE}",
            parsed_addresses=self._addresses(),
            port=self.port,
            server=f"{host}.local.",
            properties={"version": __version__},
        )
        try:
            zc = AsyncZeroconf()
        except OSError as exc:
            log.warning("zeroconf: cannot open the mDNS socket (%s); not announced", exc)
            return
        self._zeroconf = zc
        try:
            await zc.async_register_service(info, allow_name_change=True)
        except Exception as exc:
            log.warning("zeroconf: could not announce %s: %s", SERVICE_TYPE, exc)
            return
        log.info("zeroconf: announced %s as %s", SERVICE_TYPE, info.name)

    # --- describe ------------------------------------------------------------------------------
    def default_model(self) -> str:
        return self.services.default_model

    def installed_models(self) -> list[str]:
        rows = self.services.models.status()
        names = [r["name"] for r in rows if r["state"] in ("loaded", "available")]
        default = self.default_model()
        if default in names:
            names.remove(default)
            names.insert(0, default)
        return names

    @staticmethod
    def languages(name: str) -> list[str]:
        spec = CATALOGUE.get(name)
        if spec is not None and not spec.multilingual:
            return ["en"]
        return sorted(LANGUAGES)

    def info(self) -> Info:
        attribution = Attribution(name="OpenAI Whisper", url="https://github.com/openai/whisper")
        models = [
            AsrModel(
                name=name,
                attribution=attribution,
                installed=True,
                description=CATALOGUE[name].description if name in CATALOGUE else name,
                version=None,
                languages=self.languages(name),
            )
            for name in self.installed_models()
        ]
        program = AsrProgram(
            name="whisper-appliance",
            attribution=Attribution(
                name="Whisper appliance (faster-whisper)",
                url="https://github.com/SYSTRAN/faster-whisper",
            ),
            installed=True,
            description="Whisper speech-to-text appliance",
            version=__version__,
            models=models,
            supports_transcript_streaming=True,
        )
        return Info(asr=[program])

    # --- a connection --------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        try:
            if not peer_allowed(peer, self._networks()):
                self.refused += 1
                log.warning("Wyoming: refused %s (not in WYOMING_ALLOWED_NETWORKS)", peer)
                return
            limit = self.settings.wyoming_max_connections
            if limit and len(self.connections) >= limit:
                self.refused += 1
                await self._send(
                    writer, Error(f"more than {limit} connections", "too_many_connections")
                )
                return
            self.connections.add(task)
            await Connection(self, reader, writer).serve()
        except Exception:
            log.exception("Wyoming connection from %s failed", peer)
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: Any) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(async_write_event(message.event(), writer), 10)


class Connection:
    """Events of one client, one request at a time."""

    def __init__(
        self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.services = server.services
        self.settings = server.settings
        self.reader = reader
        self.writer = writer
        self.version: tuple[int, ...] = ()
        self.transcribe: Transcribe | None = None
        self.request: Request | None = None
        self.active_at = time.monotonic()

    async def send(self, message: Any) -> None:
        await asyncio.wait_for(async_write_event(message.event(), self.writer), 30)

    async def serve(self) -> None:
        try:
            while True:
                item = await self._next_event()
                if item is None:
                    return
                event, version = item
                if version:
                    self.version = version
                try:
                    await self._handle(event)
                except RequestFailedError as exc:
                    log.warning("Wyoming request failed: %s", exc.message)
                    wyoming_request(self.services, "transcribe", exc.code)
                    await self.send(Error(exc.message, exc.code))
        except ProtocolError as exc:
            log.warning("Wyoming: closing a connection: %s", exc.message)
            # inside a request it is that request's outcome; else the connection's
            kind = "transcribe" if self.request is not None else "connection"
            wyoming_request(self.services, kind, exc.code)
            with contextlib.suppress(Exception):
                await self.send(Error(exc.message, exc.code))
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            await self._drop_request()

    async def _next_event(self) -> tuple[Event, tuple[int, ...]] | None:
        idle = self.settings.wyoming_idle_timeout
        while True:
            left = self.active_at + idle - time.monotonic()
            if left <= 0:
                waited = "audio" if self.request is not None else "events"
                raise ProtocolError("idle_timeout", f"no {waited} for {idle} s; closing")
            try:
                item = await asyncio.wait_for(read_event(self.reader), left)
            except TimeoutError:
                continue  # the loop above decides (activity may have moved the deadline)
            if item is None:
                return None
            event = item[0]
            # activity: audio inside a request; outside one, anything but a ping
            if self.request is not None:
                if AudioChunk.is_type(event.type) and event.payload:
                    self.active_at = time.monotonic()
            elif not Ping.is_type(event.type):
                self.active_at = time.monotonic()
            return item

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            wyoming_request(self.services, "describe")
            await self.send(self.server.info())
        elif Ping.is_type(event.type):
            await self.send(Pong(text=str(event.data.get("text") or "")))
        elif Transcribe.is_type(event.type):
            self.transcribe = Transcribe.from_event(event)
        elif AudioStart.is_type(event.type):
            if self.request is not None:
                raise ProtocolError("unexpected_event", "audio-start inside a request")
            d = event.data
            await self._start(*_audio_format(d.get("rate"), d.get("width"), d.get("channels")))
        elif AudioChunk.is_type(event.type):
            await self._chunk(event)
        elif AudioStop.is_type(event.type):
            if self.request is None:
                raise ProtocolError("unexpected_event", "audio-stop without audio-start")
            await self._finish()
        # other events (other domains, newer protocol versions) are ignored, as the protocol asks

    # --- a request -----------------------------------------------------------------------------
    def _model_and_language(self) -> tuple[str, str | None]:
        wanted = self.transcribe.name if self.transcribe else None
        installed = self.server.installed_models()
        model = wanted if wanted in installed else self.server.default_model()
        spec = CATALOGUE.get(model)
        language = (
            self.transcribe.language if self.transcribe else None
        ) or self.services.default_language
        language = (language or "").strip().lower().split("-")[0].split("_")[0] or None
        if spec is not None and not spec.multilingual:
            language = "en"
        elif language not in LANGUAGES:
            language = None  # detect
        return model, language

    async def _start(self, rate: int, width: int, channels: int) -> None:
        model, language = self._model_and_language()
        fd, name = tempfile.mkstemp(dir=self.settings.tmp_dir, prefix="wyoming-", suffix=".wav")
        os.close(fd)
        wav = wave.open(name, "wb")  # noqa: SIM115 - written chunk by chunk, closed at the end
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        request = Request(
            model=model,
            language=language,
            rate=rate,
            width=width,
            channels=channels,
            wav_path=Path(name),
            wav=wav,
            converter=AudioChunkConverter(rate=SAMPLE_RATE, width=2, channels=1),
        )
        self.request = request
        self.server.requests += 1
        self.active_at = time.monotonic()
        if self.server.live_requests >= self.settings.workers:
            # as many live decodes as cores already: this one waits its turn in the job queue
            request.batch = True
            return
        try:
            model_obj = await request.holds_model.enter_async_context(
                self.services.models.use(model)
            )
            # the live-speech settings apply as on /ws/live
            decoder = Decoder(
                model_obj,
                language=language,
                task="transcribe",
                batching=self.settings.live_batch_decodes,
            )
            config = LiveConfig(
                silence_seconds=self.settings.live_silence_ms / 1000,
                max_utterance_seconds=float(self.settings.live_max_utterance_seconds),
                sentence_commits=self.settings.live_sentence_commits,
            )
            request.core = await asyncio.to_thread(LiveTranscriber, decoder, config)
        except ModelError as exc:  # its audio would follow: close rather than answer each chunk
            await self._drop_request()
            raise ProtocolError(exc.code, exc.message) from None
        request.session = LiveSession(request.core, lambda message: None)
        request.runner = asyncio.create_task(request.session.run())
        request.live = True
        self.server.live_requests += 1
        request.started = time.monotonic()  # pace counts from here (a model load is not audio)
        self.active_at = time.monotonic()

    async def _chunk(self, event: Event) -> None:
        d = event.data
        rate, width, channels = _audio_format(d.get("rate"), d.get("width"), d.get("channels"))
        if self.request is None:  # no audio-start: the first chunk says the format
            await self._start(rate, width, channels)
        request = self.request
        assert request is not None
        if (rate, width, channels) != (request.rate, request.width, request.channels):
            raise ProtocolError("invalid_audio", "the audio format changed inside a request")
        payload = event.payload or b""
        if len(payload) % (width * channels):
            raise ProtocolError("invalid_audio", "an audio chunk must hold whole samples")
        if not payload:
            return
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=payload)
        pcm = request.converter.convert(chunk).audio
        request.samples += len(pcm) // 2
        limit = self.settings.max_audio_duration
        if request.seconds > limit:
            raise ProtocolError(
                "audio_too_long",
                f"more than {limit} s of audio in one request (MAX_AUDIO_DURATION)",
            )
        request.wav.writeframesraw(pcm)
        if request.batch or request.session is None:
            return
        elapsed = time.monotonic() - request.started
        if request.seconds > REALTIME_PACE * elapsed + PACE_HEAD_START:
            request.batch = True  # sent faster than real time: the job queue takes it at stop
            request.session.abort()
            return
        try:
            request.session.feed(pcm)
        except BacklogError:
            request.batch = True
            request.session.abort()

    async def _finish(self) -> None:
        request = self.request
        assert request is not None
        started = time.perf_counter()
        try:
            if request.batch:
                text, language = await self._transcribe_job(request)
            else:
                text, language = await self._transcribe_live(request)
        finally:
            await self._drop_request()
            self.active_at = time.monotonic()  # the decode was not the client's idle time
        wyoming_request(self.services, "transcribe")
        log.info(
            "Wyoming: %.1f s of audio -> %d characters, %.3f s after audio-stop (%s)",
            request.seconds,
            len(text),
            time.perf_counter() - started,
            "queue" if request.batch else "live",
        )
        streaming = self.version >= STREAMING_SINCE
        if streaming:
            await self.send(TranscriptStart(language=language))
            if text:
                await self.send(TranscriptChunk(text=text))
        await self.send(Transcript(text=text, language=language))
        if streaming:
            await self.send(TranscriptStop())

    async def _transcribe_live(self, request: Request) -> tuple[str, str | None]:
        session, core, runner = request.session, request.core, request.runner
        assert session is not None and core is not None and runner is not None
        session.stop()
        try:
            await asyncio.wait_for(asyncio.shield(runner), FLUSH_TIMEOUT)
        except TimeoutError:
            raise RequestFailedError("timeout", "the transcription took too long") from None
        except Exception as exc:
            log.exception("Wyoming: live transcription failed")
            raise RequestFailedError(
                "transcription_failed", f"transcription failed: {exc}"
            ) from None
        transcript = core.transcript()
        if core.finals:
            try:
                await self.services.history.add(
                    transcript,
                    source="wyoming",
                    model=request.model,
                    filename="",
                    task="transcribe",
                    timings=core.timings(),
                )
            except Exception:
                log.exception("Wyoming: could not save the transcript to the history")
        return transcript.text.strip(), transcript.language or request.language

    async def _transcribe_job(self, request: Request) -> tuple[str, str | None]:
        request.wav.close()
        if request.samples == 0:
            return "", request.language
        job = Job(
            model=request.model,
            options=TranscribeOptions(language=request.language),
            audio_path=request.wav_path,
            duration=request.seconds,
            source="wyoming",
            filename="",
        )
        try:
            await self.services.jobs.submit(job)  # the file belongs to the job from here on
        except QueueFullError as exc:
            raise RequestFailedError("queue_full", str(exc)) from None
        except JobStoreError as exc:
            raise RequestFailedError("job_not_stored", str(exc)) from None
        await self._release_live(request)  # the aborted live decode gives its model back
        await self.services.jobs.wait(job)
        if job.result is None:
            error = job.error or {}
            raise RequestFailedError(
                error.get("code", "transcription_failed"),
                error.get("message", "the transcription failed"),
            )
        return job.result.text.strip(), job.result.language or request.language

    async def _release_live(self, request: Request) -> None:
        if request.runner is not None and not request.runner.done():
            assert request.session is not None
            request.session.abort()
            # a decode in a worker thread cannot be interrupted: wait for it before the model
            # goes back
            await asyncio.wait({request.runner}, timeout=FLUSH_TIMEOUT)
        await request.holds_model.aclose()
        if request.live:
            request.live = False
            self.server.live_requests -= 1

    async def _drop_request(self) -> None:
        """Give back what the request holds: the live decode, the model, the audio file."""
        request, self.request = self.request, None
        self.transcribe = None
        if request is None:
            return
        try:
            await asyncio.shield(self._release_live(request))
        finally:
            with contextlib.suppress(Exception):
                request.wav.close()
            # a job moved the file into DATA_DIR/jobs; anything left here is ours to delete
            request.wav_path.unlink(missing_ok=True)


async def start(services: Services) -> WyomingServer | None:
    """Start the listener; a port that cannot be bound is logged and the appliance goes on."""
    server = WyomingServer(services)
    try:
        await server.start()
    except OSError as exc:
        log.error(
            "Wyoming server not started: cannot listen on port %s: %s",
            services.settings.wyoming_port,
            exc,
        )
        return None
    return server
