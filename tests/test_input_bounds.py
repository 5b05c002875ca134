"""Every input is bounded by what it costs the server, not only by its declared size.

- multipart: a chunked body without a boundary, a huge preamble, endless part headers, an
  epilogue after the closing boundary, too many or too large form fields — refused early with a
  4xx, the rest of the body never read, the server's RSS flat (real Hypercorn, raw sockets);
- JSON: every endpoint that takes a body (enumerated from the url_map, so a new one is covered)
  answers nested, oversized, non-UTF-8 or non-object JSON with a 4xx, never a 500; `/ws/live`
  closes 1007 (or 1009), never 1011;
- history search: any query string gives 200 or a 4xx through the real HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import pytest
from quart import Quart
from websockets.asyncio.client import connect

from appliance.system.config import Settings
from appliance.web.jsonbody import JSONInputError, parse_json, parse_json_object
from tests.conftest import Server, start_server, stop_server
from tests.test_admin import Admin
from tests.test_auth import admin_password, login, login_token
from tests.test_ws_live import assert_healthy, closed_with, ws_url

LIMIT = 1_000_000
FLOOD = 300 * 1024 * 1024  # what a hostile client offers to send
RSS_BOUND = 96 * 1024 * 1024  # the most the server may grow while refusing it


# ---------------------------------------------------------------- multipart, real server


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("bounds") / "data", env={"MAX_UPLOAD_SIZE": str(LIMIT)}
    )
    yield srv
    stop_server(srv)


class PeakRSS:
    """Samples a process's RSS in a thread; `growth` is the peak above the start."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _read_reply(sock: socket.socket) -> str | None:
    """One HTTP response, or None when the server reset the connection before we read it."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                return data.decode(errors="replace") or None
            data += part
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        while len(body) < length:
            part = sock.recv(65536)
            if not part:
                break
            body += part
    except (ConnectionResetError, TimeoutError):
        return data.decode(errors="replace") or None
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def send_chunked(
    server: Server,
    path: str,
    content_type: str,
    head: bytes,
    filler: bytes,
    total: int,
    method: str = "POST",
) -> tuple[str | None, int]:
    """POST `head` then `filler` repeated up to `total` bytes, chunked (no Content-Length);
    stop as soon as the server answers or closes. Returns the reply and the bytes sent."""
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        pieces = [head] if head else []
        try:
            while True:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed): stop sending
                piece = pieces.pop() if pieces else filler
                if sent >= total:
                    sock.sendall(b"0\r\n\r\n")
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        return _read_reply(sock), sent


def assert_refused(reply: str | None, statuses: tuple[int, ...], code: str) -> None:
    """A 4xx JSON error, or a reset that lost it (the server closed with our data unread)."""
    if reply is None:
        return
    status = int(reply.split(" ", 2)[1])
    assert status in statuses, reply[:500]
    assert "application/json" in reply
    assert f'"code":"{code}"' in reply.replace(" ", ""), reply[-500:]


def assert_clean(server: Server) -> None:
    deadline = time.monotonic() + 10
    while list((server.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((server.data_dir / "tmp").iterdir()) == []
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.output()


BOUNDARY = "bnd"
FILE_PART = (
    b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    b"RIFF not really audio\r\n"
)
FLOODS = {
    # no boundary at all: the decoder waits for one forever
    "no_boundary": (b"", b"x" * 1024 * 1024, (400,), "malformed_multipart"),
    # a boundary may follow, but not after 300 MB of preamble
    "preamble": (b"preamble\r\n", b"p" * 1024 * 1024, (400,), "malformed_multipart"),
    # part headers that never end
    "part_headers": (
        b'--bnd\r\nContent-Disposition: form-data; name="x"; junk="',
        b"h" * 1024 * 1024,
        (400,),
        "malformed_multipart",
    ),
    # a complete form, then data after the closing boundary
    "epilogue": (FILE_PART + b"--bnd--\r\n", b"e" * 1024 * 1024, (413,), "body_too_large"),
    # the file itself: larger than the limit, chunked
    "file": (FILE_PART.removesuffix(b"\r\n"), b"\0" * 1024 * 1024, (413,), "file_too_large"),
}


@pytest.mark.parametrize("case", list(FLOODS))
@pytest.mark.parametrize("route", ["/transcribe", "/api/jobs", "/v1/audio/transcriptions"])
def test_chunked_flood_is_refused_with_flat_memory(
    upload_server: Server, case: str, route: str
) -> None:
    head, filler, statuses, code = FLOODS[case]
    with PeakRSS(upload_server.process.pid) as rss:
        reply, sent = send_chunked(
            upload_server,
            route,
            f"multipart/form-data; boundary={BOUNDARY}",
            head,
            filler,
            FLOOD,
        )
    assert rss.growth < RSS_BOUND, f"RSS grew by {rss.growth / 2**20:.0f} MiB"
    assert sent < FLOOD // 4, f"the server read {sent} bytes of a hostile body"
    assert_refused(reply, statuses, code)
    assert_clean(upload_server)


@pytest.mark.parametrize("path", ["/api/history", "/api/jobs/nope/events", "/health"])
def test_body_on_a_get_is_refused(upload_server: Server, path: str) -> None:
    """A handler that never reads the body (an event stream runs for as long as its job)
    must not let the server buffer one."""
    with PeakRSS(upload_server.process.pid) as rss:
        reply, sent = send_chunked(
            upload_server, path, "text/plain", b"", b"g" * 1024 * 1024, FLOOD, method="GET"
        )
    assert rss.growth < RSS_BOUND, f"RSS grew by {rss.growth / 2**20:.0f} MiB"
    assert sent < FLOOD // 4, f"the server read {sent} bytes of a hostile body"
    assert_refused(reply, (400,), "body_not_allowed")
    assert_clean(upload_server)


def _form(*parts: tuple[str, bytes]) -> bytes:
    body = b""
    for name, value in parts:
        body += (
            f'--bnd\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    return body + FILE_PART + b"--bnd--\r\n"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        # fields under their own limit (64 KiB) but too large together
        (_form(*[(f"f{i}", b"v" * 60_000) for i in range(8)]), 413, "form_too_large"),
        # more parts than a form has fields
        (_form(*[("prompt", b"") for _ in range(200)]), 400, "invalid_request"),
        (_form(*[(f"n{i}", b"1") for i in range(200)]), 400, "invalid_request"),
    ],
)
def test_form_fields_are_bounded(
    upload_server: Server, body: bytes, status: int, code: str
) -> None:
    response = httpx.post(
        f"{upload_server.url}/transcribe",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=bnd"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert_clean(upload_server)


def test_small_epilogue_and_preamble_are_fine(upload_server: Server) -> None:
    """RFC 2046 allows both; a few bytes of each must not break a normal upload."""
    body = b"a preamble\r\n" + FILE_PART + b"--bnd--\r\n" + b"an epilogue\r\n" * 10
    response = httpx.post(
        f"{upload_server.url}/transcribe",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=bnd"},
        timeout=60,
    )
    # not audio: refused by the decoder, which proves the form itself was accepted
    assert response.status_code == 415, response.text
    assert_clean(upload_server)


# ---------------------------------------------------------------- JSON reader (unit)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("[" * 100_000 + "]" * 100_000, 413),
        ("[" * 30_000 + "]" * 30_000, 400),
        ('{"a":' * 10_000 + "1" + "}" * 10_000, 400),
        ("[" * 33 + "]" * 33, 400),
        ('"' + '\\"' * 20_000, 400),  # an unterminated string: linear, refused
        ("]" * 1000 + "[" * 1000, 400),
        ("[1] [" + "[" * 1000, 400),
        ("NaN", 400),
        ("[1e999]", 400),
        ("{", 400),
    ],
)
def test_reader_refuses(text: str, status: int) -> None:
    started = time.monotonic()
    with pytest.raises(JSONInputError) as caught:
        parse_json(text)
    assert caught.value.status == status
    assert time.monotonic() - started < 1


def test_reader_accepts_what_json_accepts() -> None:
    deep = {"a": 1}
    for _ in range(31):
        deep = {"a": deep}
    for value in (
        deep,
        {"s": "[[[[{{{{" * 100, "e": '\\"]]}}', "u": "\u00e9\U0001f600"},
        [1, 2.5, None, True, "x"],
        "string",
        {"nested": [[[[]]]], "empty": {}},
    ):
        assert parse_json(json.dumps(value)) == value
        assert parse_json(json.dumps(value).encode()) == value
    with pytest.raises(JSONInputError):
        parse_json_object("[1]")
    with pytest.raises(JSONInputError):
        parse_json(b'{"a": "\xff"}')


# ---------------------------------------------------------------- JSON bodies, every endpoint

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# the endpoints that read a JSON body today; the test fails if one stops refusing bad JSON
JSON_ENDPOINTS = {
    "admin.api.login",
    "admin.api.change_password",
    "admin.api.put_settings",
    "admin.api.create_key",
    "admin.update_api.apply_update",
    "admin.update_api.rollback_update",
}
HOSTILE_JSON: dict[str, bytes] = {
    "arrays_100k": b"[" * 100_000 + b"]" * 100_000,
    "objects_100k": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "arrays_30k": b"[" * 30_000 + b"]" * 30_000,  # under 64 KiB: the RecursionError
    "objects_12k": b'{"a":' * 12_000 + b"1" + b"}" * 12_000,
    "in_a_value": b'{"password": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    "oversized": json.dumps({"password": "x" * 2_000_000}).encode(),
    "invalid_utf8": b'{"password": "\xff\xfe"}',
    "top_level_list": b"[1, 2, 3]",
    "top_level_string": b'"password"',
}


def body_routes(app: Quart) -> list[tuple[str, str, str]]:
    """(method, path, endpoint) for every HTTP route that takes a body; logout last."""
    routes = []
    for rule in app.url_map.iter_rules():
        if getattr(rule, "websocket", False):
            continue
        for method in sorted((rule.methods or set()) & BODY_METHODS):
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<{arg}>", "no-such-thing")
                path = path.replace(f"<path:{arg}>", "no-such-thing")
            routes.append((method, path, str(rule.endpoint)))
    return sorted(routes, key=lambda r: r[2] == "admin.api.logout")


async def test_every_body_endpoint_refuses_hostile_json(app: Quart, settings: Settings) -> None:
    routes = body_routes(app)
    assert {endpoint for _, _, endpoint in routes} >= JSON_ENDPOINTS
    client = app.test_client()
    admin = Admin(client, await login(client, admin_password(settings)))
    refused: dict[str, set[str]] = {}
    for method, path, endpoint in routes:
        for name, body in HOSTILE_JSON.items():
            status, answer = await admin.call(
                method, path, data=body, headers={"Content-Type": "application/json"}
            )
            assert status < 500, (method, path, name, status, answer)
            if status >= 400:
                assert answer["error"]["code"] and answer["error"]["message"], answer
                if answer["error"]["code"] in {"invalid_json", "body_too_large"}:
                    refused.setdefault(endpoint, set()).add(name)
    for endpoint in JSON_ENDPOINTS - {"admin.api.login"}:  # login: the next test, with its token
        assert refused.get(endpoint) == set(HOSTILE_JSON), (endpoint, refused.get(endpoint))


async def test_login_refuses_hostile_json_before_login(app: Quart) -> None:
    """Reachable with only the login page's cookie."""
    client = app.test_client()
    token = await login_token(client)
    limiter = app.extensions["appliance"].limiters.login
    for name, body in HOSTILE_JSON.items():
        limiter.reset("login:<local>")  # the throttle (5 a minute) comes before the body
        response = await client.post(
            "/admin/api/login",
            data=body,
            headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
        )
        assert response.status_code in (400, 413), (name, response.status_code)
        error = (await response.get_json())["error"]
        assert error["code"] in {"invalid_json", "body_too_large"}, (name, error)


# ---------------------------------------------------------------- JSON over /ws/live


@pytest.mark.parametrize(
    ("frame", "close"),
    [
        ("[" * 2000 + "]" * 2000, 1007),  # under 4 KiB, far deeper than the parser recurses
        ('{"type": "start", "x": ' + "[" * 1900 + "]" * 1900 + "}", 1007),
        ('{"type": "start", "x": ' + '{"a":' * 40 + "1" + "}" * 40 + "}", 1007),
        ("[" * 100_000 + "]" * 100_000, 1009),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, 1009),
        ('["type"]', 1007),
        ('"start"', 1007),
    ],
)
async def test_ws_hostile_json_closes_1007(server: Server, frame: str, close: int) -> None:
    log_start = len(server.output())
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(frame)
        messages, code, _ = await closed_with(ws)
    assert code == close
    assert messages and messages[0]["type"] == "error"
    assert messages[0]["code"] in {"invalid_json", "frame_too_large"}
    await assert_healthy(server)
    assert "Traceback" not in server.output()[log_start:]


async def test_ws_invalid_utf8_text_frame(server: Server) -> None:
    log_start = len(server.output())
    async with connect(ws_url(server)) as ws:
        await ws.send(b'{"type": "\xff"}', text=True)
        try:
            async with asyncio.timeout(30):
                async for _ in ws:
                    pass
        except Exception:  # noqa: S110 - only the close code matters
            pass
        # wsproto refuses the frame itself: Hypercorn drops the connection (1006) or closes
        # it with 1007; the application never sees the text, and never answers 1011
        assert ws.close_code in (1006, 1007)
    await assert_healthy(server)
    assert "Traceback" not in server.output()[log_start:]


# ---------------------------------------------------------------- history search

HOSTILE_QUERIES = [
    "%00",
    "a%00b",
    "%00%00%00",
    "%ED%A0%80",  # a lone surrogate, as UTF-8
    "%ED%B0%80x",
    "%FF%FE",
    "%C0%AF",
    '"',
    '""',
    "'",
    "\\",
    "*",
    "^",
    "a*",
    "(",
    ")",
    "-x",
    "+x",
    "NEAR(a b)",
    "a AND b OR NOT c",
    "text:foo",
    "{text filename}: x",
    "%01%02%1F%7F",
    "%C2%85",
    "%E2%80%A8",
    "%EF%BB%BF",
    "x" * 5000,
    "%00" * 2000,
    quote("名前 😀 é"),
    "%25",
    "q=1&q=2",
]


def test_history_search_never_5xx(server: Server) -> None:
    log_start = len(server.output())
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for q in HOSTILE_QUERIES:
            response = http.get(f"/api/history?q={q}")
            assert response.status_code == 200 or 400 <= response.status_code < 500, (
                q,
                response.status_code,
                response.text[:300],
            )
            body: Any = response.json()
            assert "items" in body or body["error"]["code"], body
        assert http.get("/health").status_code == 200
    assert "Traceback" not in server.output()[log_start:]
