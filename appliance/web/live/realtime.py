"""OpenAI Realtime transcription sessions over WebSocket: `/v1/realtime`.

The protocol of OpenAI's Realtime API for transcription sessions (`OpenAI-Beta: realtime=v1`,
what `client.beta.realtime.connect(...)` speaks), on the live-speech machinery of `/ws/live`:
`RealtimeConnection` is a `LiveConnection` with another wire format. Shared, not copied: the
origin check, the session slots (`LIVE_MAX_SESSIONS`), the wall-clock and idle limits, the rate
and backlog limits (`_feed_audio`), the VAD, partial re-decoding with stable prefixes, finals,
the cleanup on a dropped connection and the history entry (source `realtime`). API keys and the
rate limit of live sessions are `appliance.web.security.websocket_refusal`, run after accepting so
that a refusal is an OpenAI `error` event.

Mapping (docs/reference/live-protocol.md): the client's 24 kHz PCM16 is resampled to 16 kHz by
FFmpeg's resampler (as `appliance.core.audio` does); with `server_vad` turn detection an item is a
turn of the live VAD (`vad` speech → `input_audio_buffer.speech_started`, silence →
`speech_stopped`, `committed`, `conversation.item.created`); `delta` events carry the words the
live core has made stable (they are never taken back), `completed` the finals' text. With
`turn_detection: null` an item is the audio between two `input_audio_buffer.commit`.

Bad client events get an `error` event and the session goes on (as OpenAI does); what ends a
`/ws/live` session (limits, origin, keys, overload) ends this one too, with an `error` event
and the same close code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from quart import Blueprint, websocket

from appliance.core.engines.base import SAMPLE_RATE
from appliance.core.live.session import LiveConfig, LiveSession, LiveTranscriber
from appliance.web import security
from appliance.web.api.options import parse_language
from appliance.web.api.submit import resolve_model
from appliance.web.errors import APIError
from appliance.web.jsonbody import JSONInputError, parse_json_object
from appliance.web.live.routes import (
    FLUSH_TIMEOUT,
    LiveConnection,
    Refusal,
    SessionLimit,
    TokenBucket,
    registry,
)
from appliance.web.services import services

blueprint = Blueprint("realtime", __name__)

INPUT_RATE = 24_000  # OpenAI's pcm16: 24 kHz, mono, 16-bit little-endian
EVENT_SLACK = 4096  # bytes of JSON around an append's base64 audio
MIN_COMMIT_MS = 100
OPENAI_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")  # = the default
SERVER_ERRORS = ("internal_error", "model_load_failed", "overloaded")
EVENT_FIELDS = {
    "transcription_session.update": {"session"},
    "input_audio_buffer.append": {"audio"},
    "input_audio_buffer.commit": set(),
    "input_audio_buffer.clear": set(),
}
SESSION_FIELDS = {
    "input_audio_format",
    "input_audio_transcription",
    "turn_detection",
    # accepted and ignored: no noise reduction, no logprobs, text only, no ephemeral keys
    "input_audio_noise_reduction",
    "include",
    "modalities",
    "client_secret",
}
TRANSCRIPTION_FIELDS = {"model", "language", "prompt"}
TURN_FIELDS = {
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    # for responses and semantic VAD: accepted and ignored
    "create_response",
    "interrupt_response",
    "eagerness",
}
PREFIX_PADDING_MS = (0, 1000)
SILENCE_MS = (100, 5000)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class EventError(Exception):
    """A client event refused with an `error` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class Resampler:
    """PCM16 mono at `rate` -> 16 kHz PCM16, streaming (FFmpeg's resampler keeps the filter
    state between calls, so chunk borders leave no clicks)."""

    def __init__(self, rate: int = INPUT_RATE) -> None:
        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = None
        return b"".join(
            out.to_ndarray().reshape(-1).astype("<i2").tobytes()
            for out in self._resampler.resample(frame)
        )


@dataclass
class Item:
    """One user item: a turn (server VAD) or the audio between two commits."""

    id: str
    last: int | None = None  # the turn's last utterance, once speech stopped
    committed: bool = False
    discarded: bool = False
    finals: list[str] = field(default_factory=list)
    partial: str = ""  # the stable words of the utterance being decoded
    sent: str = ""  # what the delta events carried
    seconds: float = 0.0

    def text(self, with_partial: bool = True) -> str:
        parts = [*self.finals, self.partial] if with_partial else self.finals
        return " ".join(p for p in parts if p)


def _string(values: dict[str, Any], key: str, param: str) -> str | None:
    value = values.get(key)
    if value is not None and not isinstance(value, str):
        raise EventError("invalid_type", f"{param} must be a string", param)
    return value


def _unknown(values: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for key in values:
        if key not in allowed:
            raise EventError(
                "unknown_parameter", f"Unknown parameter: '{prefix}{key}'.", f"{prefix}{key}"
            )


def _number(
    values: dict[str, Any], key: str, low: float, high: float, default: float, *, integer: bool
) -> float:
    value = values.get(key)
    if value is None:
        return default
    param = f"session.turn_detection.{key}"
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise EventError("invalid_value", f"{param} must be {kind} from {low} to {high}", param)
    return value


@blueprint.websocket("/v1/realtime")
async def realtime_socket() -> None:
    """OpenAI Realtime transcription sessions; docs/reference/live-protocol.md."""
    await RealtimeConnection().serve()


class RealtimeConnection(LiveConnection):
    history_source = "realtime"
    awaiting = "no audio"

    def __init__(self) -> None:
        super().__init__(services(), registry())
        self.realtime_id = _new_id("sess")
        self.model: str | None = None  # as the client named it; None: the default model
        self.language: str | None = None  # None: the live default
        self.prompt: str | None = None
        self.turn: dict[str, Any] | None = self._default_turn()
        # an append carries at most as much audio as a /ws/live frame (at 24 kHz)
        self.max_audio = self.limits["max_frame_bytes"] * INPUT_RATE // SAMPLE_RATE // 2 * 2
        self.max_base64 = 4 * math.ceil(self.max_audio / 3)
        self.resample = Resampler()
        self.first_audio: bytes | None = None
        self.core: LiveTranscriber | None = None
        self.items: list[Item] = []
        self.open: Item | None = None  # the item audio goes to now
        self.previous_item_id: str | None = None
        self.buffered = 0  # 16 kHz samples since the last commit or turn
        self.client_event_id: str | None = None

    def _default_turn(self) -> dict[str, Any]:
        """Server VAD with the live defaults (`LIVE_SILENCE_MS`)."""
        return {
            "type": "server_vad",
            "threshold": LiveConfig.threshold,
            "prefix_padding_ms": round(LiveConfig.pre_roll_seconds * 1000),
            "silence_duration_ms": self.settings.live_silence_ms,
        }

    # --- events out ---------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        self.outbox.put_nowait({"type": kind, "event_id": _new_id("event"), **fields})

    def send(self, message: dict[str, Any]) -> None:
        """Messages of the live core and of `LiveConnection`, as OpenAI events."""
        self.metrics.live_message(message)
        kind = message["type"]
        if kind == "error":
            code = message["code"]
            self._emit(
                "error",
                error={
                    "type": "server_error" if code in SERVER_ERRORS else "invalid_request_error",
                    "code": code,
                    "message": message["message"],
                    "param": message.get("param"),
                    "event_id": self.client_event_id,
                },
            )
        elif kind == "vad" and self.turn is not None:
            self._turn(message)
        elif kind in ("partial", "final"):
            item = self._item_for(message["utterance"])
            item.partial = message["stable"] if kind == "partial" else ""
            if kind == "final":
                if message["text"]:
                    item.finals.append(message["text"])
                item.seconds += message["end"] - message["start"]
            self._delta(item)
        elif kind == "end":
            self._complete_all()
        # ready, pong, lag: nothing in OpenAI's protocol
        self._complete_settled()

    def _session_object(self) -> dict[str, Any]:
        return {
            "id": self.realtime_id,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_transcription": {
                "model": self.model or "whisper-1",
                "language": self.language,
                "prompt": self.prompt or "",
            },
            "turn_detection": self.turn,
            "input_audio_noise_reduction": None,
            "include": None,
            "modalities": ["text"],
            "client_secret": None,
        }

    def _new_item(self) -> Item:
        item = Item(_new_id("item"))
        self.items.append(item)
        self.open = item
        return item

    def _item_for(self, utterance: int) -> Item:
        for item in self.items:
            if item.last is None or item.last >= utterance:
                return item
        return self._new_item()

    def _turn(self, message: dict[str, Any]) -> None:
        at_ms = round(message["at"] * 1000)
        if message["speech"]:
            item = self.open or self._new_item()
            assert self.turn is not None
            start = max(0, at_ms - int(self.turn["prefix_padding_ms"]))
            self._emit("input_audio_buffer.speech_started", audio_start_ms=start, item_id=item.id)
            return
        ended = self.open
        if ended is None:
            return
        ended.last = message["utterance"]
        self._emit("input_audio_buffer.speech_stopped", audio_end_ms=at_ms, item_id=ended.id)
        self._commit_item(ended)
        self.open = None
        self.buffered = 0

    def _commit_item(self, item: Item) -> None:
        item.committed = True
        previous, self.previous_item_id = self.previous_item_id, item.id
        self._emit("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)
        self._emit(
            "conversation.item.created",
            previous_item_id=previous,
            item={
                "id": item.id,
                "object": "realtime.item",
                "type": "message",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
        )

    def _delta(self, item: Item, with_partial: bool = True) -> None:
        text = item.text(with_partial)
        if item.discarded or len(text) <= len(item.sent) or not text.startswith(item.sent):
            return
        delta, item.sent = text[len(item.sent) :], text
        self._emit(
            "conversation.item.input_audio_transcription.delta",
            item_id=item.id,
            content_index=0,
            delta=delta,
        )

    def _complete(self, item: Item) -> None:
        if item.discarded:
            return
        self._delta(item, with_partial=False)
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item.id,
            content_index=0,
            transcript=item.text(with_partial=False),
            usage={"type": "duration", "seconds": round(item.seconds, 3)},
        )

    def _complete_settled(self) -> None:
        """Complete committed turns whose finals are all out (or dropped: a click, silence)."""
        while self.items and self.core is not None:
            item = self.items[0]
            if not (item.committed and item.last is not None and self.core.settled(item.last)):
                return
            self._complete(self.items.pop(0))

    def _complete_all(self) -> None:
        """After a flush every final is out: commit what is open, complete everything."""
        if self.open is not None and not self.open.committed and not self.open.discarded:
            self._commit_item(self.open)
        self.open = None
        while self.items:
            self._complete(self.items.pop(0))

    # --- events in ----------------------------------------------------------------------------
    async def _guarded(self) -> tuple[int, str]:
        refused = await security.websocket_refusal()
        if refused is not None:
            body = await refused.get_json()
            error = body.get("error", {}) if isinstance(body, dict) else {}
            limited = refused.status_code == 429
            raise Refusal(
                1013 if limited else 1008,
                str(error.get("code", "unauthorized")),
                str(error.get("message", "refused")),
                "rate limited" if limited else "unauthorized",
            )
        return await super()._guarded()

    def _event(self, frame: str | bytes) -> dict[str, Any]:
        self.client_event_id = None
        if isinstance(frame, bytes):
            raise EventError(
                "invalid_event",
                "send JSON text events; audio goes base64 in input_audio_buffer.append",
            )
        max_bytes = self.max_base64 + EVENT_SLACK
        if len(frame) > max_bytes:
            raise EventError(
                "event_too_large",
                f"events are at most {max_bytes} bytes: send audio in chunks of at most "
                f"{self.max_audio} bytes ({self.max_audio / INPUT_RATE / 2:g} s at 24 kHz)",
            )
        try:
            event = parse_json_object(frame, max_bytes=max_bytes)
        except JSONInputError as exc:
            raise EventError("invalid_json", exc.message) from None
        event_id = event.get("event_id")
        if isinstance(event_id, str):
            self.client_event_id = event_id[:100]
        kind = event.get("type")
        if kind not in EVENT_FIELDS:
            supported = ", ".join(f"'{k}'" for k in EVENT_FIELDS)
            raise EventError(
                "invalid_value",
                f"Invalid value: {str(kind)[:100]!r}. Supported values are: {supported}.",
                "type",
            )
        _unknown(event, EVENT_FIELDS[kind] | {"type", "event_id"}, "")
        return event

    def _audio(self, event: dict[str, Any]) -> bytes:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("invalid_type", "audio must be a base64 string", "audio")
        too_large = EventError(
            "audio_too_large",
            f"an append carries at most {self.max_audio} bytes of audio "
            f"({self.max_audio / INPUT_RATE / 2:g} s of 24 kHz PCM16); send smaller chunks",
            "audio",
        )
        if len(audio) > self.max_base64:
            raise too_large
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("invalid_base64", "audio is not valid base64", "audio") from None
        if len(pcm) > self.max_audio:
            raise too_large
        if len(pcm) % 2:
            raise EventError("invalid_audio", "PCM16 audio holds whole 16-bit samples", "audio")
        return pcm

    def _error_event(self, exc: EventError) -> None:
        self.send({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})

    async def _start_message(self) -> dict[str, Any]:
        """Session updates until the first audio, which starts the live core (the model and
        the language are fixed from then on)."""
        requested = websocket.args.get("model")
        if requested and requested not in OPENAI_MODELS:
            try:  # the URL may name a model of the appliance; an OpenAI model is the default
                resolve_model(requested)
                self.model = requested
            except APIError:
                pass
        self._emit("transcription_session.created", session=self._session_object())
        while True:
            frame = await self._receive()
            try:
                event = self._event(frame)
                if event["type"] == "input_audio_buffer.append":
                    self.first_audio = self._audio(event)
                    model = None if self.model in OPENAI_MODELS else self.model
                    return {"type": "start", "model": model, "language": self.language}
                await self._handle(event, None)
            except EventError as exc:
                self._error_event(exc)

    def _live_config(self) -> LiveConfig:
        config = super()._live_config()
        if self.turn is None:
            return config
        threshold = float(self.turn["threshold"])
        return dataclasses.replace(
            config,
            threshold=threshold,
            neg_threshold=max(0.01, threshold - 0.15),
            pre_roll_seconds=self.turn["prefix_padding_ms"] / 1000,
            silence_seconds=self.turn["silence_duration_ms"] / 1000,
        )

    async def _pump(self, session: LiveSession, runner: asyncio.Task[None]) -> str:
        self.core = session.core
        bucket = TokenBucket(self.limits["max_bytes_per_second"])
        limit = SessionLimit(self.limits["max_session_minutes"])
        first, self.first_audio = self.first_audio, None
        if first is not None and self._append(session, first, bucket):
            return self._limit_reached(limit)
        while True:
            try:
                frame = await self._receive()
            except SessionLimit as reached:
                return self._limit_reached(reached)
            if runner.done():
                runner.result()  # an error while transcribing surfaces here
                raise RuntimeError("the live transcriber stopped")
            self._complete_settled()  # a turn whose final was empty emits nothing
            try:
                event = self._event(frame)
                if event["type"] == "input_audio_buffer.append":
                    if self._append(session, self._audio(event), bucket):
                        return self._limit_reached(limit)
                else:
                    await self._handle(event, session)
            except EventError as exc:
                self._error_event(exc)

    def _append(self, session: LiveSession, pcm: bytes, bucket: TokenBucket) -> bool:
        if self.turn is None and self.open is None:
            self._new_item()
        audio = self.resample(pcm)
        self.buffered += len(audio) // 2
        return self._feed_audio(session, audio, bucket)

    async def _handle(self, event: dict[str, Any], session: LiveSession | None) -> None:
        kind = event["type"]
        if kind == "transcription_session.update":
            self._update(event.get("session"))
            self._emit("transcription_session.updated", session=self._session_object())
        elif kind == "input_audio_buffer.commit":
            ms = self.buffered * 1000 / SAMPLE_RATE
            if session is None or ms < MIN_COMMIT_MS:
                raise EventError(
                    "input_audio_buffer_commit_empty",
                    f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                    f"but the buffer holds {ms:.2f} ms",
                )
            await self._flush(session)
            if self.open is None:
                self._new_item()  # audio without speech: an empty transcript
            self._complete_all()
            self.buffered = 0
        elif kind == "input_audio_buffer.clear":
            if session is not None:
                if self.open is not None:
                    self.open.discarded = True
                await self._flush(session)
                self._complete_all()
            self.buffered = 0
            self._emit("input_audio_buffer.cleared")

    async def _flush(self, session: LiveSession) -> None:
        """End the current utterance at this point of the audio and wait for its final."""
        try:
            await asyncio.wait_for(session.flush(), FLUSH_TIMEOUT)
        except TimeoutError:
            raise Refusal(
                1013, "overloaded", "the engine could not finish the turn", "engine overloaded"
            ) from None
        self.active_at = time.monotonic()  # decoding is not the client's idle time

    def _update(self, values: Any) -> None:
        if not isinstance(values, dict):
            raise EventError("invalid_type", "session must be an object", "session")
        _unknown(values, SESSION_FIELDS, "session.")
        if values.get("input_audio_format", "pcm16") != "pcm16":
            raise EventError(
                "invalid_value",
                "input_audio_format must be pcm16 (24 kHz mono 16-bit little-endian)",
                "session.input_audio_format",
            )
        model, language, prompt = self.model, self.language, self.prompt
        if "input_audio_transcription" in values:
            model, language, prompt = self._transcription(values["input_audio_transcription"])
        turn = self._turn_detection(values) if "turn_detection" in values else self.turn
        if self.core is not None and (model, language) != (self.model, self.language):
            raise EventError(
                "session_already_started",
                "the model and the language are fixed once audio was appended: "
                "open a new session to change them",
                "session.input_audio_transcription",
            )
        self.model, self.language, self.prompt, self.turn = model, language, prompt, turn
        if self.core is not None:
            self.core.config = self._live_config()

    def _transcription(self, values: Any) -> tuple[str | None, str | None, str | None]:
        prefix = "session.input_audio_transcription"
        if values is None:
            return None, None, None
        if not isinstance(values, dict):
            raise EventError("invalid_type", f"{prefix} must be an object or null", prefix)
        _unknown(values, TRANSCRIPTION_FIELDS, prefix + ".")
        model = _string(values, "model", prefix + ".model")
        language = _string(values, "language", prefix + ".language")
        prompt = _string(values, "prompt", prefix + ".prompt")
        try:
            if model not in OPENAI_MODELS:
                resolve_model(model)
        except APIError as exc:
            raise EventError(exc.code, exc.message, prefix + ".model") from None
        try:
            parse_language(language)
        except APIError as exc:
            raise EventError(exc.code, exc.message, prefix + ".language") from None
        return model, language or None, prompt

    def _turn_detection(self, values: dict[str, Any]) -> dict[str, Any] | None:
        prefix = "session.turn_detection"
        turn = values["turn_detection"]
        if turn is None:
            return None
        if not isinstance(turn, dict):
            raise EventError("invalid_type", f"{prefix} must be an object or null", prefix)
        _unknown(turn, TURN_FIELDS, prefix + ".")
        if turn.get("type", "server_vad") != "server_vad":
            raise EventError(
                "invalid_value",
                "turn_detection.type must be server_vad (or turn_detection null)",
                prefix + ".type",
            )
        current = self.turn or self._default_turn()
        return {
            "type": "server_vad",
            "threshold": _number(
                turn, "threshold", 0.05, 0.95, current["threshold"], integer=False
            ),
            "prefix_padding_ms": int(
                _number(
                    turn,
                    "prefix_padding_ms",
                    *PREFIX_PADDING_MS,
                    current["prefix_padding_ms"],
                    integer=True,
                )
            ),
            "silence_duration_ms": int(
                _number(
                    turn,
                    "silence_duration_ms",
                    *SILENCE_MS,
                    current["silence_duration_ms"],
                    integer=True,
                )
            ),
        }
