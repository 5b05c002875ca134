"""Request validation: one pydantic model per route family, the same one in /openapi.json.

Every refused value is a 400 JSON error whose message names the field (never a 500), form
fields are validated before any audio is probed or any URL fetched (the uploaded file is
deleted), and JSON bodies pass the bounded reader before the model sees them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import pytest
from pydantic import BaseModel, ValidationError
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.core.formats import EXPORT_FORMATS
from appliance.system.config import Settings
from appliance.web.api.openai_compat import OpenAITranscriptionForm, OpenAITranslationForm
from appliance.web.api.options import OutputFormat, build_options, parse_language, parse_task
from appliance.web.api.transcribe import TranscribeForm
from appliance.web.api.validation import form_data
from appliance.web.errors import APIError, describe_validation
from tests.test_admin import Admin
from tests.test_auth import admin_password, login

if TYPE_CHECKING:
    from quart.typing import TestClientProtocol

HOSTILE = "\x00<script>" + "ü" * 5000


def refusal(model: type[BaseModel], data: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return describe_validation(info.value)


# ---------------------------------------------------------------- the models themselves


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        ({"language": "klingon"}, "invalid_language", "language"),
        ({"language": HOSTILE}, "invalid_language", "language"),
        ({"language": ["en", "de"]}, "invalid_request", "language"),
        ({"task": "summarise"}, "invalid_task", "task"),
        ({"format": "docx"}, "invalid_format", "format"),
        ({"word_timestamps": "perhaps"}, "invalid_request", "word_timestamps"),
        ({"vad_filter": HOSTILE}, "invalid_request", "vad_filter"),
        ({"num_speakers": "0"}, "invalid_request", "num_speakers"),
        ({"num_speakers": "21"}, "invalid_request", "num_speakers"),
        ({"min_speakers": "two"}, "invalid_request", "min_speakers"),
        ({"min_speakers": "5", "max_speakers": "2"}, "invalid_request", "max_speakers"),
    ],
)
def test_transcribe_form_names_the_field(data: dict[str, Any], code: str, field: str) -> None:
    got_code, message = refusal(TranscribeForm, data)
    assert got_code == code
    assert message.startswith(f"{field}: "), message
    assert len(message) < 300  # a hostile value is quoted back cut short


def test_transcribe_form_defaults_and_blanks() -> None:
    form = TranscribeForm.model_validate(
        {"language": " AUTO ", "task": "", "format": " SRT ", "word_timestamps": "", "x": "1"}
    )
    assert (form.language, form.task, form.format, form.word_timestamps) == (
        None,
        "transcribe",
        "srt",
        False,
    )
    form = TranscribeForm.model_validate({"language": "De", "num_speakers": "2", "batched": "on"})
    assert form.language == "de" and form.diarize and form.batched
    options = form.options()
    assert options.language == "de" and options.num_speakers == 2 and options.batched


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        ({}, "invalid_request", "model"),
        ({"model": "whisper-1", "response_format": "xml"}, "invalid_response_format",
         "response_format"),
        ({"model": "whisper-1", "temperature": "hot"}, "invalid_request", "temperature"),
        ({"model": "whisper-1", "temperature": "7"}, "invalid_request", "temperature"),
        ({"model": "whisper-1", "temperature": "nan"}, "invalid_request", "temperature"),
        ({"model": "whisper-1", "timestamp_granularities": ["char"]}, "invalid_request",
         "timestamp_granularities.0"),
        ({"model": "whisper-1", "timestamp_granularities": "word"}, "invalid_request",
         "timestamp_granularities"),
        ({"model": "whisper-1", "stream": "true", "response_format": "srt"}, "invalid_request",
         "stream"),
    ],
)  # fmt: skip
def test_openai_form_names_the_field(data: dict[str, Any], code: str, field: str) -> None:
    got_code, message = refusal(OpenAITranscriptionForm, data)
    assert got_code == code
    assert message.startswith(f"{field}: "), message


def test_openai_translation_form_has_no_language_nor_stream() -> None:
    form = OpenAITranslationForm.model_validate(
        {"model": "whisper-1", "language": "klingon", "stream": "true", "response_format": "srt"}
    )
    assert form.response_format == "srt"
    schema = OpenAITranslationForm.model_json_schema()["properties"]
    assert "language" not in schema and "stream" not in schema
    form = OpenAITranslationForm.model_validate(
        {"model": "x", "response_format": "diarized_json", "timestamp_granularities": ["segment"]}
    )
    assert form.diarize and not form.words


def test_form_data_follows_quart_schema() -> None:
    fields = {
        "model": ["whisper-1"],
        "timestamp_granularities[]": ["word", "segment"],
        "prompt": ["a", "b"],
    }
    assert form_data(fields) == {
        "model": "whisper-1",
        "timestamp_granularities": ["word", "segment"],
        "prompt": ["a", "b"],
    }
    form = OpenAITranscriptionForm.model_validate(
        form_data({"model": ["m"], "timestamp_granularities[]": ["word"], "response_format":
                   ["verbose_json"]})
    )  # fmt: skip
    assert form.words


def test_rules_outside_a_model_are_the_same_rules() -> None:
    """Live speech and `build_options` use the same field types, as `APIError` 400."""
    assert parse_language(" EN ") == "en" and parse_language("auto") is None
    assert parse_task(None) == "transcribe" and parse_task(" Translate") == "translate"
    for call in (
        lambda: parse_language("klingon"),
        lambda: parse_task("summarise"),
        lambda: parse_language(5),
        lambda: build_options(language=None, task=None, batched="maybe"),
    ):
        with pytest.raises(APIError) as info:
            call()
        assert info.value.status == 400 and info.value.message


# ---------------------------------------------------------------- through the routes


def audio_part() -> FileStorage:
    # not audio: a form that passes validation would end at the probe with 415
    return FileStorage(io.BytesIO(b"RIFF" + b"\0" * 400), filename="a.wav")


async def post_form(
    client: TestClientProtocol, path: str, form: dict[str, str], **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.post(path, form=form, files={"file": audio_part()}, **kwargs)
    return response.status_code, await response.get_json()


def assert_names(status: int, body: dict[str, Any], field: str, code: str = "") -> None:
    assert status == 400, body
    error = body["error"]
    assert error["message"].startswith(f"{field}: "), error
    if code:
        assert error["code"] == code, error


async def test_upload_routes_refuse_bad_fields(app: Quart, settings: Settings) -> None:
    client = app.test_client()
    cases: list[tuple[str, dict[str, str], str, str]] = [
        ("/transcribe", {"language": "klingon"}, "language", "invalid_language"),
        ("/transcribe", {"num_speakers": "0"}, "num_speakers", "invalid_request"),
        ("/transcribe", {"max_speakers": HOSTILE}, "max_speakers", "invalid_request"),
        ("/api/jobs", {"task": "summarise"}, "task", "invalid_task"),
        ("/api/jobs", {"format": "docx"}, "format", "invalid_format"),
        ("/v1/audio/transcriptions", {"response_format": "json"}, "model", "invalid_request"),
        ("/v1/audio/transcriptions", {"model": "whisper-1", "temperature": "-1"}, "temperature",
         "invalid_request"),
        ("/v1/audio/translations", {"model": "whisper-1", "response_format": "xml"},
         "response_format", "invalid_response_format"),
    ]  # fmt: skip
    for path, form, field, code in cases:
        status, body = await post_form(client, path, form)
        assert_names(status, body, field, code)
    # a `url` is not fetched when a field is wrong (the URL would be refused: loopback)
    fields = {"url": "http://127.0.0.1:9/a.wav", "language": "klingon"}
    parts = b"".join(
        f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    response = await client.post(
        "/transcribe",
        data=parts + b"--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_names(response.status_code, await response.get_json(), "language")
    # a valid form goes on to the probe: the fields were accepted
    status, body = await post_form(client, "/transcribe", {"language": "", "format": "SRT"})
    assert status == 415, body
    assert list(settings.tmp_dir.iterdir()) == []


async def test_asr_query_is_fastapis_422(app: Quart) -> None:
    client = app.test_client()
    for query, loc in (
        ({"num_speakers": "0"}, ["query", "num_speakers"]),
        ({"output": "docx"}, ["query", "output"]),
        ({"encode": "maybe"}, ["query", "encode"]),
    ):
        response = await client.post("/asr", query_string=query, files={"audio_file": audio_part()})
        assert response.status_code == 422
        body = await response.get_json()
        assert body["detail"][0]["loc"] == loc, body
        assert body["error"]["code"] == "invalid_request"
        assert body["error"]["message"].startswith(f"{loc[1]}: ")
    response = await client.post(
        "/detect-language", query_string={"encode": "2"}, files={"audio_file": audio_part()}
    )
    assert response.status_code == 422
    assert (await response.get_json())["detail"][0]["type"] == "bool_parsing"


async def test_query_strings_are_validated(app: Quart) -> None:
    client = app.test_client()
    for path, field in (
        ("/api/history?limit=abc", "limit"),
        ("/api/history?limit=0", "limit"),
        ("/api/history?offset=-1", "offset"),
        ("/api/jobs/nope/result?format=docx", "format"),
        ("/api/history/nope/export?format=" + "x" * 5000, "format"),
    ):
        response = await client.get(path)
        assert_names(response.status_code, await response.get_json(), field)
    page = await (await client.get("/api/history?limit=&offset=&q=")).get_json()
    assert (page["limit"], page["offset"]) == (20, 0)


async def test_admin_bodies_and_queries(app: Quart, settings: Settings) -> None:
    admin = Admin(client := app.test_client(), await login(client, admin_password(settings)))
    cases: list[tuple[str, str, dict[str, Any], str, str]] = [
        ("POST", "/admin/api/keys", {"json": {"name": " "}}, "name", "invalid_name"),
        ("POST", "/admin/api/keys", {"json": {"name": "<b>"}}, "name", "invalid_name"),
        ("POST", "/admin/api/keys", {"json": {"name": 5}}, "name", "invalid_request"),
        ("POST", "/admin/api/keys", {"json": {}}, "name", "invalid_request"),
        ("POST", "/admin/api/password", {"json": {"current": 1, "new": "x"}}, "current", ""),
        ("POST", "/admin/api/updates/apply", {"json": {"url": "x"}}, "url", "invalid_request"),
        ("POST", "/admin/api/updates/rollback", {"json": {"to_version": 1}}, "to_version", ""),
        ("GET", "/admin/api/logs?level=LOUD", {}, "level", "invalid_level"),
        ("GET", "/admin/api/logs?lines=0", {}, "lines", "invalid_request"),
    ]
    for method, path, kwargs, field, code in cases:
        status, body = await admin.call(method, path, **kwargs)
        assert_names(status, body, field, code)
    # the bounded reader runs before the model: too deep, too large, not UTF-8
    for body in (b"[" * 40 + b"]" * 40, b'{"name": "' + b"x" * 70_000 + b'"}', b'{"name": "\xff"}'):
        status, answer = await admin.call(
            "POST", "/admin/api/keys", data=body, headers={"Content-Type": "application/json"}
        )
        assert status in (400, 413), answer
        assert answer["error"]["code"] in {"invalid_json", "body_too_large"}, answer
    status, created = await admin.call("POST", "/admin/api/keys", json={"name": "  bazarr "})
    assert status == 201 and created["name"] == "bazarr"


async def test_openapi_shows_the_request_models(client: TestClientProtocol) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    paths = spec["paths"]

    def properties(path: str, method: str = "post") -> dict[str, Any]:
        content = paths[path][method]["requestBody"]["content"]
        schema = next(iter(content.values()))["schema"]
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        result: dict[str, Any] = schema["properties"]
        return result

    transcribe = properties("/transcribe")
    for field in ("file", "url", "language", "task", "format", "num_speakers", "batched"):
        assert field in transcribe, field
    assert transcribe["task"]["enum"] == ["transcribe", "translate"] or "transcribe" in str(
        transcribe["task"]
    )
    assert "language" in properties("/v1/audio/transcriptions")
    assert "language" not in properties("/v1/audio/translations")
    assert "name" in properties("/admin/api/keys")
    history = {p["name"] for p in paths["/api/history"]["get"]["parameters"]}
    assert {"q", "limit", "offset"} <= history
    asr = {p["name"] for p in paths["/asr"]["post"]["parameters"]}
    assert {"task", "language", "output", "encode", "num_speakers"} <= asr


def test_no_hand_parsing_left() -> None:
    """Each rule once: the API modules no longer read `request.args` or parse fields by hand."""
    api = Path(__file__).resolve().parents[1] / "appliance" / "web" / "api"
    for module in api.glob("*.py"):
        text = module.read_text()
        assert "request.args" not in text, module.name
        assert "parse_bool(" not in text and "parse_float(" not in text, module.name


def test_output_format_type_lists_the_export_formats() -> None:
    assert set(get_args(get_args(OutputFormat)[0])) == set(EXPORT_FORMATS)
