"""The official `openai` client, unchanged, pointed at the appliance."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.conftest import Server
from tests.wer import normalise


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-a-lan-appliance")


def test_json(client: openai.OpenAI, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert "ask not what your country can do for you" in normalise(result.text)


def test_text_srt_vtt(client: openai.OpenAI, jfk_wav: Path) -> None:
    for fmt, marker in (("text", "fellow"), ("srt", "00:00:00,000 -->"), ("vtt", "WEBVTT")):
        with jfk_wav.open("rb") as f:
            result = client.audio.transcriptions.create(
                model="tiny.en",
                file=f,
                response_format=fmt,  # type: ignore[call-overload]
            )
        assert isinstance(result, str)
        assert marker in result


def test_verbose_json_with_words(client: openai.OpenAI, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
            temperature=0.0,
            prompt="John F. Kennedy inaugural address.",
        )
    assert result.language == "en"
    assert result.duration == pytest.approx(11.0, abs=0.1)
    assert result.segments and result.segments[0].start == 0.0
    assert result.words and any(w.word.lower().startswith("americans") for w in result.words)


# openai 3.x marks audio.translations deprecated (OpenAI's own models moved on); the endpoint
# is still part of the API the appliance promises, so the client call must keep working.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_translation(client: openai.OpenAI, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        result = client.audio.translations.create(model="whisper-1", file=f)
    assert "your country" in normalise(result.text)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "whisper-1" in ids
    assert "tiny.en" in ids


def test_errors_surface_as_openai_errors(client: openai.OpenAI, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="xml",  # type: ignore[arg-type]
        )
    assert "response_format" in str(info.value)
    with jfk_wav.open("rb") as f, pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="no-such-model", file=f)
