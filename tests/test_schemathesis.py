"""schemathesis against the live OpenAPI schema of a real server.

A real `whisper-appliance serve` (Hypercorn, real tiny.en, real SQLite) on a free port, with
API keys required and the rate limits raised far above what the run sends, so the
transcription endpoints really transcribe instead of answering 429. Every operation of
`/openapi.json` is generated (valid and invalid inputs) and checked for two things only: no
5xx (`not_a_server_error`) and every documented response matching its schema
(`response_schema_conformance`). The API is called with an API key, the admin API with an
admin session and its CSRF token. Multipart `file` fields get real speech (short WAV and FLAC
cuts of JFK), silence, a truncated header or random bytes; half of the valid upload cases are
steered to what a client sends (real audio, generated flags), so the engine really runs. The
admin endpoints whose JSON body the schema does not describe get arbitrary and hostile JSON.

Bounded and reproducible: MAX_EXAMPLES per operation and mode, Hypothesis derandomized (the
same cases every run), no shrinking, no example database; 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import io
import json
import re
import wave
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.transport.serialization import Binary

from appliance.core import auth as auth_mod
from appliance.system.update import spool as update_spool
from tests.conftest import CLIPS, Server, start_server, stop_server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 20
CHECKS = [not_a_server_error, response_schema_conformance]
TIMEOUT = 120


def _pcm(seconds: float) -> np.ndarray:
    with wave.open(str(CLIPS / "jfk.wav"), "rb") as clip:
        rate = clip.getframerate()
        frames = clip.readframes(int(rate * seconds))
    return np.frombuffer(frames, dtype=np.int16)


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())
    return out.getvalue()


def _flac(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = "mono"  # type: ignore[attr-defined]
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):  # type: ignore[attr-defined]
            container.mux(packet)
        for packet in stream.encode(None):  # type: ignore[attr-defined]
            container.mux(packet)
    return out.getvalue()


def audio_samples() -> list[bytes]:
    """Real audio first (Hypothesis draws early elements more often), then edge cases."""
    speech = _pcm(2.5)
    return [
        _wav(speech),
        _flac(_pcm(1.5)),
        _wav(np.zeros(8000, dtype=np.int16)),  # half a second of silence
        _wav(speech)[:200],  # a truncated header
    ]


@pytest.fixture(scope="module")
def st_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("schemathesis") / "data",
        env={
            "REQUIRE_API_KEY": "true",
            "API_RATE_LIMIT": "100000/minute",
            "LOGIN_RATE_LIMIT": "100000/minute",
        },
    )
    yield srv
    stop_server(srv)


class Clients:
    """An admin session (cookie + CSRF token) and an API key, re-established when lost."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.admin = requests.Session()
        self.csrf = ""
        self.login()
        response = self.admin.post(
            f"{server.url}/admin/api/keys",
            json={"name": "schemathesis"},
            headers={"X-CSRF-Token": self.csrf},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        self.key = str(response.json()["key"])
        self.api = requests.Session()
        self.statuses: Counter[tuple[str, int]] = Counter()

    def consume_update_request(self) -> None:
        """Take the request out of the spool as the root updater would (it does not run here),
        so the next update case is judged on its input, not refused with 409."""
        spool = update_spool.spool_dir(self.server.data_dir)
        for entry in spool.iterdir():
            if entry.name == update_spool.REQUEST or entry.name.startswith(
                update_spool.UPLOAD_PREFIX
            ):
                entry.unlink()

    def login(self) -> None:
        url = self.server.url
        password = (self.server.data_dir / auth_mod.PASSWORD_FILE).read_text().strip()
        self.admin.cookies.clear()
        page = self.admin.get(f"{url}/admin/login", timeout=30)
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert token, page.text
        response = self.admin.post(
            f"{url}/admin/api/login",
            json={"password": password},
            headers={"X-CSRF-Token": token.group(1)},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        page = self.admin.get(f"{url}/admin/settings", timeout=30)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf, page.text
        self.csrf = csrf.group(1)


@pytest.fixture(scope="module")
def clients(st_server: Server) -> Clients:
    return Clients(st_server)


@pytest.fixture(scope="module")
def live_schema(st_server: Server) -> BaseSchema:
    schemathesis.openapi.format(
        "binary",
        st.one_of(st.sampled_from(audio_samples()), st.binary(max_size=4096)),
    )
    document = requests.get(f"{st_server.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(file_parts_as_files(document))
    schema.config.update(base_url=st_server.url)
    return schema


def file_parts_as_files(document: dict[str, Any]) -> dict[str, Any]:
    """A nullable multipart file (`anyOf: [{format: binary}, {type: null}]`, what an optional
    upload becomes) is sent by schemathesis as a text field, never as a file part; an optional
    non-nullable binary property means the same to the server (the part may be left out)."""
    for operation in (op for ops in document["paths"].values() for op in ops.values()):
        if not isinstance(operation, dict):
            continue
        content = operation.get("requestBody", {}).get("content", {})
        form = content.get("multipart/form-data", {}).get("schema", {})
        for name, prop in list(form.get("properties", {}).items()):
            binary = [s for s in prop.get("anyOf", []) if s.get("format") == "binary"]
            if binary:
                form["properties"][name] = {**binary[0], "description": prop.get("description", "")}
    return document


def call(case: Case, clients: Clients) -> Response:
    """Send a case the way a real client would: the admin API with the session, the rest
    with the API key."""
    path = case.operation.path
    if not path.startswith("/admin"):
        response = case.call(
            session=clients.api,
            headers={"Authorization": f"Bearer {clients.key}"},
            timeout=TIMEOUT,
        )
    else:
        response = case.call(
            session=clients.admin, headers={"X-CSRF-Token": clients.csrf}, timeout=TIMEOUT
        )
        # A generated logout (or a session lost some other way) ends the login: log in again.
        if path == "/admin/api/logout" or response.status_code == 401:
            clients.login()
        if path.startswith("/admin/api/updates/") and response.status_code == 202:
            clients.consume_update_request()
    clients.statuses[case.operation.label, response.status_code] += 1
    return response


def as_client_would(case: Case, audio: bytes) -> Case:
    """What a real client sends: real audio as the file part and, of the generated fields, only
    the flags (booleans). The schema can only call most fields "a string" (a language, a model,
    a URL to fetch instead of the file, a callback URL), so generated values are refused with
    400, rightly, and the engine would never run."""
    properties = case.operation.body[0].definition.get("schema", {}).get("properties", {})
    if "file" in properties:
        generated = case.body if isinstance(case.body, dict) else {}
        flags = {
            name: value
            for name, value in generated.items()
            if name in properties and name != "file" and isinstance(value, bool)
        }
        case.body = {**flags, "file": Binary(audio)}
        if "model" in case.operation.body[0].definition["schema"].get("required", []):
            case.body["model"] = "whisper-1"  # the OpenAI endpoints require it
    return case


def cases(operation: APIOperation, mode: GenerationMode) -> st.SearchStrategy[Case]:
    """Generated cases; for valid ones with a body, half are steered to what a client sends."""
    generated = operation.as_strategy(generation_mode=mode)
    if mode is not GenerationMode.POSITIVE or not operation.body:
        return generated
    steered = st.builds(as_client_would, generated, st.sampled_from(audio_samples()[:3]))
    return st.one_of(generated, steered)


def run_operation(operation: APIOperation, mode: GenerationMode, clients: Clients) -> None:
    @given(case=cases(operation, mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # a fixed seed per operation: the same cases every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failure is reported
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        response = call(case, clients)
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:
            curl = case.as_curl_command(headers=dict(response.request.headers))
            raise AssertionError(f"{exc}\nreproduce: {curl}") from None

    run()


@pytest.mark.timeout(600)  # about a minute on 2 idle cores; shared machines are slower
def test_live_schema(live_schema: BaseSchema, clients: Clients) -> None:
    failures: list[str] = []
    ran = 0
    for result in live_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run_operation(operation, mode, clients)
            except Unsatisfiable:
                continue  # nothing to make invalid (no parameters, or free-form strings)
            except Exception as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
            ran += 1
    assert not failures, "\n\n".join(failures)
    assert ran >= 50, ran
    print(f"schemathesis: {sum(clients.statuses.values())} requests, {ran} operation runs")
    for (label, status), count in sorted(clients.statuses.items()):
        print(f"  {label} -> {status}: {count}")
    # The transcription endpoints really transcribed (rate limits raised, real audio sent).
    for label, status in (
        ("POST /transcribe", 200),
        ("POST /api/jobs", 202),
        ("POST /v1/audio/transcriptions", 200),
        ("POST /v1/audio/translations", 200),
    ):
        assert clients.statuses[label, status], (label, sorted(clients.statuses.items()))


# Admin endpoints that read a JSON body the schema does not describe: schemathesis sends them
# nothing, so they get arbitrary JSON here (and real setting names with arbitrary values).
JSON_ENDPOINTS = [
    ("POST", "/admin/api/keys"),
    ("PUT", "/admin/api/settings"),
    ("POST", "/admin/api/password"),
    ("POST", "/admin/api/updates/apply"),
    ("POST", "/admin/api/updates/rollback"),
    ("POST", "/admin/api/login"),
]
SETTING_NAMES = [
    "default_model",
    "default_language",
    "max_upload_size",
    "history_retention_days",
    "history_max_rows",
    "live_max_sessions",
    "live_max_minutes",
    "require_api_key",
    "allowed_origins",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
json_bodies = (
    json_values
    | st.fixed_dictionaries(
        {}, optional={name: json_values for name in [*SETTING_NAMES, "name", "password"]}
    )
).map(lambda value: json.dumps(value).encode())
hostile_bodies = [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"{" + b'"k":1,' * 20_000 + b'"k":1}',
    b'"\\' + b"\\" * 40_000 + b'"',
    b"\xff\xfe{}",
    b"1e999999",
    b"",
]


def fuzz_json(send: Callable[[bytes], None]) -> None:
    @given(body=json_bodies)
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(body: bytes) -> None:
        send(body)

    run()


def test_admin_json_bodies(st_server: Server, clients: Clients) -> None:
    before = clients.admin.get(f"{st_server.url}/admin/api/settings", timeout=30).json()
    login_page = requests.Session()
    page = login_page.get(f"{st_server.url}/admin/login", timeout=30)
    match = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert match
    login_token = match.group(1)
    failures: list[str] = []

    def send(method: str, path: str, body: bytes) -> None:
        session, token = (
            (login_page, login_token)
            if path == "/admin/api/login"
            else (clients.admin, clients.csrf)
        )
        response = session.request(
            method,
            f"{st_server.url}{path}",
            data=body,
            # A fresh connection each time: a refusal sent before the body was read may end
            # the connection, and a pooled one would then fail the next request.
            headers={
                "Content-Type": "application/json",
                "X-CSRF-Token": token,
                "Connection": "close",
            },
            timeout=TIMEOUT,
        )
        if response.status_code >= 500:
            failures.append(f"{method} {path} {body[:200]!r} -> {response.status_code}")
        if path.startswith("/admin/api/updates/") and response.status_code == 202:
            clients.consume_update_request()

    for method, path in JSON_ENDPOINTS:
        for body in hostile_bodies:
            send(method, path, body)
        fuzz_json(partial(send, method, path))
    # Put back whatever a generated body managed to change.
    restored = clients.admin.put(
        f"{st_server.url}/admin/api/settings",
        json=before["values"],
        headers={"X-CSRF-Token": clients.csrf},
        timeout=30,
    )
    assert restored.status_code == 200, restored.text
    assert not failures, "\n".join(failures)


def test_lone_surrogate_in_json_is_refused(st_server: Server, clients: Clients) -> None:
    for method, path, body in (
        ("POST", "/admin/api/keys", b'{"name": "\\ud800"}'),
        ("PUT", "/admin/api/settings", b'{"default_language": "\\udfff"}'),
        ("POST", "/admin/api/password", b'{"current": "\\ud800", "new": "\\ud800\\ud800"}'),
    ):
        response = clients.admin.request(
            method,
            f"{st_server.url}{path}",
            data=body,
            headers={"Content-Type": "application/json", "X-CSRF-Token": clients.csrf},
            timeout=30,
        )
        assert response.status_code < 500, (method, path, body, response.status_code)


def test_every_operation_is_covered(live_schema: BaseSchema) -> None:
    """The schema the run above walked has every public API surface in it."""
    labels = {op.ok().label for op in live_schema.get_all_operations()}
    for expected in (
        "POST /transcribe",
        "POST /api/jobs",
        "POST /v1/audio/transcriptions",
        "POST /v1/audio/translations",
        "GET /api/history",
        "PUT /admin/api/settings",
        "POST /admin/api/updates/upload",
    ):
        assert expected in labels


def test_samples_are_real_audio() -> None:
    for sample in audio_samples()[:3]:
        with av.open(io.BytesIO(sample)) as container:
            assert container.streams.audio
    assert Path(CLIPS / "jfk.wav").is_file()
