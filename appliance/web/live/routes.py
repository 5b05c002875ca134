"""The `/ws/live` WebSocket route and `GET /api/live` (sessions running, limits).

HTTP concerns live here (origin, frame sizes, rate, JSON parsing, close codes); the work is
done by `LiveSession`. One task receives, one sends (an outbox queue), one transcribes; a
client that goes away cancels the handler, and every `finally` below gives back what the
session held (its slot, the model, the worker thread) and saves what was transcribed.

Limits that free a slot: `LIVE_MAX_MINUTES` of wall-clock time from accept (whatever the
client sends or doesn't), and `LIVE_IDLE_TIMEOUT` without audio (pings and other control
messages do not count as activity).

Close codes: 1000 after `stop` (or the session length limit), 1001 idle timeout, 1003 an
unexpected message (audio before `start`, a second `start`, an unknown type), 1007 malformed
JSON or audio, 1008 origin refused / rate exceeded / invalid `start`, 1009 frame too large,
1011 internal error, 1013 too many sessions or engine overloaded. An `error` message with a
`code` and a human `message` always comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint, Response, current_app, jsonify, websocket

from appliance.core.engines.base import SAMPLE_RATE
from appliance.core.live.decoder import Decoder
from appliance.core.live.session import BacklogError, LiveConfig, LiveSession, LiveTranscriber
from appliance.core.model_manager import ModelError
from appliance.exceptions import ApplianceError
from appliance.web.api.options import parse_language, parse_task
from appliance.web.api.submit import resolve_model
from appliance.web.errors import APIError
from appliance.web.jsonbody import parse_json
from appliance.web.services import Services, services

log = logging.getLogger(__name__)

blueprint = Blueprint("live", __name__)

MAX_TEXT_FRAME = 4096
BURST_SECONDS = 2.0
FLUSH_TIMEOUT = 60.0
DISCONNECT_FLUSH_TIMEOUT = 15.0


@dataclass
class LiveRegistry:
    """Live sessions of this app: a slot is taken from accept to the last cleanup."""

    active: int = 0
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: int = 0


class Refusal(ApplianceError):
    """End the connection: an `error` message, then a close with `close_code`."""

    def __init__(self, close_code: int, code: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code
        self.message = message
        self.reason = reason


class SessionLimit(Refusal):
    """`LIVE_MAX_MINUTES` reached: during a session it ends like `stop` (the error, the last
    finals, `end`, close 1000); before `ready` it is a plain refusal with the same code."""

    def __init__(self, minutes: float) -> None:
        super().__init__(
            1000,
            "session_limit",
            f"live sessions last at most {minutes:g} minutes (wall-clock time from "
            "connecting, and as much audio); this one has reached it",
            "maximum session length reached",
        )


def same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    netloc = parts.netloc.lower()
    host = host.lower()
    default = {"https": ":443", "http": ":80"}.get(parts.scheme, "")
    return bool(netloc) and (
        netloc == host or netloc + default == host or netloc == host.removesuffix(default)
    )


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...]) -> bool:
    """Browsers always send Origin; a WebSocket from another site's page is refused."""
    if origin is None:
        return True  # not a browser (CLI, bench): nothing to forge
    wanted = origin.strip().lower().rstrip("/")
    return same_origin(wanted, host) or wanted in {o.lower().rstrip("/") for o in allowed}


class TokenBucket:
    """Bytes per second with a burst of `BURST_SECONDS`, refilled continuously."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = rate * BURST_SECONDS
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self, amount: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


def _limits(s: Services) -> dict[str, Any]:
    settings = s.settings
    minutes = float(s.runtime.live_max_minutes)
    return {
        "max_frame_bytes": settings.live_max_frame_bytes,
        "max_bytes_per_second": settings.live_max_bytes_per_second,
        "idle_timeout_seconds": settings.live_idle_timeout,
        "max_utterance_seconds": settings.live_max_utterance_seconds,
        "silence_ms": settings.live_silence_ms,
        "max_sessions": s.runtime.live_max_sessions,
        "max_session_minutes": int(minutes) if minutes.is_integer() else minutes,
    }


def registry() -> LiveRegistry:
    result: LiveRegistry = current_app.extensions["live"]
    return result


@blueprint.get("/api/live")
async def live_status() -> Response:
    """Live sessions running now, and the limits a new one gets."""
    reg = registry()
    s = services()
    return jsonify(
        {
            "sessions": reg.active,
            "started_total": reg.started,
            "chunk_samples": s.settings.audio_chunk_size,
            "sample_rate": SAMPLE_RATE,
            "limits": _limits(s),
        }
    )


@blueprint.websocket("/ws/live")
async def live_socket() -> None:
    """Live transcription; the protocol is in docs/reference/live-protocol.md."""
    await LiveConnection(services(), registry()).serve()


class LiveConnection:
    """One `/ws/live` connection; `appliance.web.api.realtime` speaks OpenAI's Realtime protocol
    on the same machinery by overriding the protocol parts (`send`, `_start_message`,
    `_live_config`, `_pump`)."""

    history_source = "live"
    awaiting = "no start message"  # what the idle limit waited for before `ready`

    def __init__(self, s: Services, reg: LiveRegistry) -> None:
        self.services = s
        self.settings = s.settings
        self.registry = reg
        self.metrics = s.models.metrics  # issue 14: Prometheus metrics
        self.limits = _limits(s)
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.session_id = uuid.uuid4().hex
        self.accepted_at = time.monotonic()  # wall-clock limit: set again at accept
        self.active_at = self.accepted_at  # idle limit: accept, `ready`, then each audio frame
        self.ready = False

    def send(self, message: dict[str, Any]) -> None:
        self.metrics.live_message(message)  # final latency, audio seconds, errors
        self.outbox.put_nowait(message)

    async def _sender(self) -> None:
        while (message := await self.outbox.get()) is not None:
            await websocket.send(json.dumps(message))

    async def serve(self) -> None:
        await websocket.accept()
        self.accepted_at = self.active_at = time.monotonic()
        sender = asyncio.create_task(self._sender())
        code, reason = 1011, "internal error"
        try:
            code, reason = await self._guarded()
        except Refusal as refusal:
            self.send({"type": "error", "code": refusal.code, "message": refusal.message})
            code, reason = refusal.close_code, refusal.reason
        except Exception:
            log.exception("live session %s failed", self.session_id)
            self.send(
                {"type": "error", "code": "internal_error", "message": "internal error; see log"}
            )
        finally:
            self.outbox.put_nowait(None)
            try:
                await asyncio.wait_for(sender, 10)
            except (TimeoutError, Exception):
                sender.cancel()
        with contextlib.suppress(Exception):  # the client may be gone already
            await websocket.close(code, reason)

    async def _guarded(self) -> tuple[int, str]:
        origin = websocket.headers.get("Origin")
        allowed = self.services.runtime.allowed_origins
        if not origin_allowed(origin, websocket.host, tuple(allowed)):
            log.warning("live: refused origin %r for host %r", origin, websocket.host)
            raise Refusal(
                1008,
                "origin_not_allowed",
                f"origin {origin!r} may not open live sessions on this appliance "
                "(add it to the allowed origins)",
                "origin not allowed",
            )
        most = self.limits["max_sessions"]
        if most and self.registry.active >= most:
            raise Refusal(
                1013,
                "too_many_sessions",
                f"{self.registry.active} live sessions are running, the most this appliance "
                "allows; try again when one ends",
                "too many live sessions",
            )
        self.registry.active += 1
        self.registry.started += 1
        self.metrics.live_sessions_started.inc()
        try:
            return await self._session()
        finally:
            self.registry.active -= 1
            self.registry.sessions.pop(self.session_id, None)

    def _idle(self) -> Refusal:
        timeout = self.limits["idle_timeout_seconds"]
        what = "no audio (pings do not count)" if self.ready else self.awaiting
        return Refusal(
            1001,
            "idle_timeout",
            f"{what} for {timeout} s; the live session was closed",
            "idle timeout",
        )

    async def _receive(self) -> str | bytes:
        """The next frame, waiting at most until the idle or the session length limit.

        Only audio (and `ready`) moves the idle limit (`active_at`), so a client that sends
        nothing but pings is closed like one that sends nothing; the session length limit
        counts wall-clock time from accept, whatever arrives.
        """
        now = time.monotonic()
        idle_left = self.active_at + self.limits["idle_timeout_seconds"] - now
        minutes = self.limits["max_session_minutes"]
        limit_left = self.accepted_at + minutes * 60 - now if minutes else math.inf
        if limit_left <= 0:
            raise SessionLimit(minutes)
        if idle_left <= 0:
            raise self._idle()
        try:
            return await asyncio.wait_for(websocket.receive(), min(idle_left, limit_left))
        except TimeoutError:
            raise (SessionLimit(minutes) if limit_left <= idle_left else self._idle()) from None

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        if len(text) > MAX_TEXT_FRAME:
            raise Refusal(
                1009, "frame_too_large", "control messages are small JSON objects", "too large"
            )
        try:
            message = parse_json(text, max_bytes=MAX_TEXT_FRAME)
        except ValueError:  # JSONInputError: malformed, or nested too deeply
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise Refusal(
                1007,
                "invalid_json",
                'control messages are JSON objects with a "type" (start, stop, ping)',
                "malformed JSON",
            )
        return message

    async def _start_message(self) -> dict[str, Any]:
        frame = await self._receive()
        if isinstance(frame, bytes):
            raise Refusal(
                1003,
                "unexpected_audio",
                'send {"type": "start"} before any audio',
                "audio before start",
            )
        message = self._parse(frame)
        if message["type"] != "start":
            raise Refusal(
                1003,
                "unexpected_message",
                f'expected {{"type": "start"}} first, got {message["type"]!r}',
                "expected start",
            )
        return message

    def _options(self, start: dict[str, Any]) -> tuple[str, str | None, str]:
        try:
            for key in ("model", "language", "task"):
                if start.get(key) is not None and not isinstance(start[key], str):
                    raise APIError(400, "invalid_request", f"{key} must be a string")
            rate = start.get("sample_rate", SAMPLE_RATE)
            if rate != SAMPLE_RATE:
                raise APIError(
                    400,
                    "invalid_sample_rate",
                    f"send 16-bit mono PCM at {SAMPLE_RATE} Hz (resample in the client), "
                    f"not {rate!r}",
                )
            model = resolve_model(start.get("model"))
            language_value = start.get("language")
            if language_value is None:
                language_value = self.services.default_language
            language = parse_language(language_value)
            task = parse_task(start.get("task"))
        except APIError as exc:
            raise Refusal(1008, exc.code, exc.message, "invalid start") from None
        return model, language, task

    async def _session(self) -> tuple[int, str]:
        model_name, language, task = self._options(await self._start_message())
        try:
            async with self.services.models.use(model_name) as model:
                return await self._transcribe(model_name, model, language, task)
        except ModelError as exc:
            raise Refusal(1011, exc.code, exc.message, "model unavailable") from None

    async def _transcribe(
        self, model_name: str, model: Any, language: str | None, task: str
    ) -> tuple[int, str]:
        batching = self.settings.live_batch_decodes
        decoder = Decoder(model, language=language, task=task, batching=batching)
        core = await asyncio.to_thread(LiveTranscriber, decoder, self._live_config())
        session = LiveSession(core, self.send)
        self.registry.sessions[self.session_id] = {"model": model_name, "started": time.time()}
        self.send(
            {
                "type": "ready",
                "session_id": self.session_id,
                "model": model_name,
                "language": language or "auto",
                "task": task,
                "sample_rate": SAMPLE_RATE,
                "chunk_samples": self.settings.audio_chunk_size,
                "limits": self.limits,
            }
        )
        self.ready = True
        self.active_at = time.monotonic()  # loading the model is not the client's idle time
        runner = asyncio.create_task(session.run())
        code, reason = 1000, "session ended"
        try:
            reason = await self._pump(session, runner)
            session.stop()
            await asyncio.wait_for(asyncio.shield(runner), FLUSH_TIMEOUT)
        except Refusal as refusal:
            # the error comes first, then `end` with what was saved of the session
            self.send({"type": "error", "code": refusal.code, "message": refusal.message})
            code, reason = refusal.close_code, refusal.reason
        finally:
            if not runner.done():
                # refused or dropped mid-utterance: finish what was said (bounded), and in
                # any case let the decode in the worker thread end before the model goes back
                session.stop()
                done, _ = await asyncio.wait({runner}, timeout=DISCONNECT_FLUSH_TIMEOUT)
                if not done:
                    session.abort()
                    await asyncio.wait({runner}, timeout=FLUSH_TIMEOUT)
            history_id = await self._save(core, model_name, task)
        self.send(
            {
                "type": "end",
                "session_id": self.session_id,
                "history_id": history_id,
                "text": core.transcript().text,
                "duration": round(core.position / SAMPLE_RATE, 3),
                "reason": reason,
                "timings": core.timings(),
            }
        )
        return code, reason

    def _live_config(self) -> LiveConfig:
        return LiveConfig(
            silence_seconds=self.settings.live_silence_ms / 1000,
            max_utterance_seconds=float(self.settings.live_max_utterance_seconds),
            sentence_commits=self.settings.live_sentence_commits,
        )

    def _limit_reached(self, limit: SessionLimit) -> str:
        """The session length limit ends a session like `stop`, with an error first."""
        self.send({"type": "error", "code": limit.code, "message": limit.message})
        return limit.reason

    async def _pump(self, session: LiveSession, runner: asyncio.Task[None]) -> str:
        """Receive until `stop` or the session length limit; audio goes to the session as it
        comes. The limit is wall-clock time, and also caps the audio received (which the
        rate limit lets come faster than real time)."""
        bucket = TokenBucket(self.limits["max_bytes_per_second"])
        max_frame = self.limits["max_frame_bytes"]
        while True:
            try:
                frame = await self._receive()
            except SessionLimit as limit:
                return self._limit_reached(limit)
            if runner.done():
                runner.result()  # an error while transcribing surfaces here
                raise RuntimeError("the live transcriber stopped")
            if isinstance(frame, str):
                message = self._parse(frame)
                kind = message["type"]
                if kind == "stop":
                    return "stopped"
                if kind == "ping":
                    self.send({"type": "pong", "backlog_seconds": session.backlog_seconds})
                    continue
                raise Refusal(
                    1003,
                    "unexpected_message",
                    f"unexpected message type {kind!r} during a session (send audio or stop)",
                    "unexpected message",
                )
            if len(frame) > max_frame:
                raise Refusal(
                    1009,
                    "frame_too_large",
                    f"an audio frame may hold at most {max_frame} bytes, got {len(frame)}",
                    "frame too large",
                )
            if self._feed_audio(session, frame, bucket):
                return self._limit_reached(SessionLimit(self.limits["max_session_minutes"]))

    def _feed_audio(self, session: LiveSession, pcm: bytes, bucket: TokenBucket) -> bool:
        """16 kHz PCM to the session, within the rate and backlog limits; True once the audio
        received reaches the session length limit."""
        if not bucket.take(len(pcm)):
            raise Refusal(
                1008,
                "rate_limited",
                f"audio faster than {bucket.rate} bytes/s (16 kHz PCM); send audio in real time",
                f"more than {bucket.rate} bytes/s",
            )
        try:
            session.feed(pcm)
        except ValueError as exc:
            raise Refusal(1007, "invalid_audio", str(exc), "invalid audio") from None
        except BacklogError as exc:
            raise Refusal(1013, "overloaded", str(exc), "engine overloaded") from None
        if pcm:  # only audio is activity: an empty frame does not hold the slot
            self.active_at = time.monotonic()
        max_samples = self.limits["max_session_minutes"] * 60 * SAMPLE_RATE
        return bool(max_samples) and session.received_bytes // 2 >= max_samples

    async def _save(self, core: LiveTranscriber, model_name: str, task: str) -> str | None:
        if not core.finals:
            return None
        try:
            return await self.services.history.add(
                core.transcript(),
                source=self.history_source,
                model=model_name,
                filename="",
                task=task,
                timings=core.timings(),
            )
        except Exception:
            log.exception("could not save live session %s", self.session_id)
            return None
