"""`stream=true` on /v1/audio/transcriptions with the official `openai` client, and the extra
faster-whisper form fields (`hotwords`, `vad_filter`, `word_timestamps`)."""

from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent
from quart import Quart

from appliance.core import audio
from appliance.core.engines.base import (
    SAMPLE_RATE,
    Segment,
    TranscribeOptions,
    Transcript,
    TranscriptionInfo,
)
from appliance.core.jobs import Job, JobState
from appliance.web.api import openai_compat
from appliance.web.errors import APIError
from tests.conftest import JFK_TEXT, Server
from tests.wer import normalise, wer


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-a-lan-appliance")


@pytest.fixture(scope="module")
def long_wav(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About two minutes of speech (the clips one after the other): several 30 s windows."""
    pieces = [clips / "jfk.wav", *sorted((clips / "librivox").glob("*.wav"))] * 3
    silence = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    joined = np.concatenate([part for p in pieces for part in (audio.decode(p), silence)])
    path = tmp_path_factory.mktemp("long") / "long.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((joined * 32767).astype("<i2").tobytes())
    return path


def test_stream_with_the_openai_client(client: openai.OpenAI, long_wav: Path) -> None:
    with long_wav.open("rb") as f:
        stream = client.audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        events = list(stream)
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    done = [e for e in events if isinstance(e, TranscriptionTextDoneEvent)]
    assert len(done) == 1 and events[-1] is done[0]
    assert len(deltas) >= 2, events  # one per decoded segment
    assert all(e.type == "transcript.text.delta" and e.delta for e in deltas)
    assert "".join(e.delta for e in deltas) == done[0].text
    assert normalise(done[0].text).count("ask not what your country can do for you") == 3


def test_stream_jfk_text_is_right(client: openai.OpenAI, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        stream = client.audio.transcriptions.create(
            model="tiny.en", file=f, stream=True, language="en", response_format="text"
        )
        events = list(stream)
    assert [e.type for e in events][-1] == "transcript.text.done"
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent)
    assert wer(JFK_TEXT, done.text) == 0.0
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == done.text


def test_stream_wire_format(server: Server, jfk_wav: Path) -> None:
    with (
        jfk_wav.open("rb") as f,
        httpx.stream(
            "POST",
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data={"model": "whisper-1", "stream": "true"},
            timeout=120,
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        body = r.read().decode()
    chunks = [c for c in body.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks)
    events = [json.loads(c.removeprefix("data: ")) for c in chunks]
    assert events[0]["type"] == "transcript.text.delta"
    assert set(events[0]) == {"type", "delta"}
    assert events[-1] == {"type": "transcript.text.done", "text": events[-1]["text"]}
    assert "ask not what your country" in normalise(events[-1]["text"])


def test_stream_bad_input(client: openai.OpenAI, jfk_wav: Path, server: Server) -> None:
    with pytest.raises(openai.APIStatusError) as info:  # 415 has no class of its own
        client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", b"not audio at all" * 50), stream=True
        )
    assert info.value.status_code == 415
    with jfk_wav.open("rb") as f, pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="no-such-model", file=f, stream=True)
    with jfk_wav.open("rb") as f, pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(
            model="whisper-1", file=f, stream=True, response_format="srt"
        )
    assert "stream" in str(bad.value)
    with jfk_wav.open("rb") as f:
        invalid = httpx.post(
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data={"model": "whisper-1", "stream": "perhaps"},
            timeout=30,
        )
    assert invalid.status_code == 400
    assert invalid.json()["error"]["code"] == "invalid_request"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_extra_fields(client: openai.OpenAI, jfk_wav: Path, server: Server) -> None:
    with jfk_wav.open("rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            extra_body={"hotwords": "Americans", "vad_filter": "true", "word_timestamps": "true"},
        )
    assert "ask not what your country" in normalise(result.text)
    assert result.words and any(w.word.lower().startswith("americans") for w in result.words)
    with jfk_wav.open("rb") as f:
        bad = httpx.post(
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data={"model": "whisper-1", "vad_filter": "maybe"},
            timeout=30,
        )
    assert bad.status_code == 400


async def _drive(
    job: Job, steps: list[Segment | JobState], *, done_text: str | None = None
) -> list[dict[str, object]]:
    """Feed a job's segments (and its end) the way the worker does, and read the stream."""

    async def worker() -> None:
        for step in steps:
            await asyncio.sleep(0.01)
            if isinstance(step, Segment):
                job.segments.append(step)
            else:
                job.state = step
                if step == JobState.DONE:
                    info = TranscriptionInfo("en", 1.0, 10.0)
                    job.result = Transcript.from_segments(info, job.segments)
                    assert done_text is None or job.result.text == done_text
                job.done.set()
            job.touch()

    app = Quart(__name__)
    async with app.app_context():
        task = asyncio.create_task(worker())
        try:
            response = await openai_compat._stream(job)
            assert response.status_code == 200
            body = b"".join([chunk async for chunk in response.response])  # type: ignore[attr-defined]
        finally:
            await task
    return [json.loads(c.removeprefix(b"data: ")) for c in body.split(b"\n\n") if c]


def _job() -> Job:
    return Job(model="tiny.en", options=TranscribeOptions(), audio_path=Path("x"), duration=10)


def _segment(i: int, text: str) -> Segment:
    return Segment(id=i, start=i, end=i + 1, text=text)


async def test_deltas_join_to_the_done_text_whatever_the_spaces() -> None:
    segments = [
        _segment(0, "  Hello"),
        _segment(1, " world. "),
        _segment(2, ""),
        _segment(3, " Next "),
    ]
    events = await _drive(_job(), [*segments, JobState.DONE], done_text="Hello world.  Next")
    deltas = [e["delta"] for e in events[:-1]]
    assert deltas == ["Hello", " world.", "  Next"]
    assert events[-1] == {"type": "transcript.text.done", "text": "Hello world.  Next"}


async def test_a_job_that_fails_mid_stream_ends_with_an_error_event() -> None:
    events = await _drive(_job(), [_segment(0, " Hello"), JobState.CANCELLED])
    assert events[0] == {"type": "transcript.text.delta", "delta": "Hello"}
    assert events[-1]["type"] == "error"
    assert events[-1]["error"] == {
        "code": "cancelled",
        "message": "the transcription was cancelled",
    }


async def test_a_job_that_fails_before_any_text_is_a_json_error() -> None:
    job = _job()
    job.error = {"code": "unsupported_audio", "message": "not audio"}
    job.state = JobState.FAILED
    job.done.set()
    app = Quart(__name__)
    async with app.app_context():
        with pytest.raises(APIError) as info:
            await openai_compat._stream(job)
    assert info.value.status == 415
