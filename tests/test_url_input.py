"""URL input (issue 15) on a real server: `url` instead of `file` on /api/jobs, /transcribe and
/v1/audio/transcriptions, downloaded from a local source server under MAX_UPLOAD_SIZE (also
when its Content-Length lies), the same probe as uploads, and the SSRF rules of webhooks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import JFK_TEXT, Server, free_port, start_server, stop_server
from tests.wer import wer

LIMIT = 1_000_000  # MAX_UPLOAD_SIZE of the server under test; jfk.wav is 352 KB


@pytest.fixture(scope="module")
def source(jfk_wav: Path) -> Iterator[str]:
    """Where the files come from: a real HTTP server with good and hostile answers."""
    wav = jfk_wav.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path
            if path == "/jfk.wav":
                self._send(200, {"Content-Length": str(len(wav))}, wav)
            elif path == "/moved":
                self._send(302, {"Location": "/jfk.wav", "Content-Length": "0"})
            elif path == "/to-metadata":
                self._send(
                    302, {"Location": "http://169.254.169.254/latest/", "Content-Length": "0"}
                )
            elif path == "/to-ipv6-loopback":
                self._send(302, {"Location": f"http://[::1]:{free_port()}/", "Content-Length": "0"})
            elif path == "/notes.txt":
                body = b"this is not audio\n" * 100
                self._send(200, {"Content-Length": str(len(body))}, body)
            elif path == "/big-declared":
                self._send(200, {"Content-Length": str(5 * LIMIT)}, b"\0" * 1000)
            elif path == "/big-unannounced":  # no length: the end is the connection's end
                self._send(200, {"Connection": "close"})
                self._stream(3 * LIMIT)
            elif path == "/lying":  # announces 1000 bytes, sends 3 MB (chunked)
                self._send(200, {"Content-Length": "1000", "Transfer-Encoding": "chunked"})
                self._stream(3 * LIMIT, chunked=True)
            else:
                self._send(404, {"Content-Length": "9"}, b"not found")

        def _stream(self, total: int, chunked: bool = False) -> None:
            block = b"\0" * 65536
            try:
                for _ in range(total // len(block) + 1):
                    if chunked:
                        self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                    else:
                        self.wfile.write(block)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the appliance hung up: what it should do
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def allowing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("url-input") / "data",
        env={"OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32", "MAX_UPLOAD_SIZE": str(LIMIT)},
    )
    yield srv
    stop_server(srv)


def post_url(server: Server, url: str, route: str = "/transcribe", **fields: str) -> httpx.Response:
    # multipart/form-data without a file part, as `curl -F url=...` sends it
    data = {"url": url, **fields}
    files = {name: (None, value) for name, value in data.items()}
    return httpx.post(f"{server.url}{route}", files=files, timeout=120)


def test_transcribes_a_url(allowing: Server, source: str) -> None:
    response = post_url(allowing, f"{source}/jfk.wav")
    assert response.status_code == 200, response.text
    assert wer(JFK_TEXT, response.json()["text"]) == 0.0
    entry = httpx.get(f"{allowing.url}/api/history", timeout=10).json()["items"][0]
    assert entry["filename"] == "jfk.wav"


def test_follows_an_allowed_redirect_and_queues_a_job(allowing: Server, source: str) -> None:
    response = post_url(allowing, f"{source}/moved", "/api/jobs")
    assert response.status_code == 202, response.text
    assert response.json()["filename"] == "jfk.wav"


def test_openai_endpoint_takes_a_url(allowing: Server, source: str) -> None:
    response = post_url(
        allowing, f"{source}/jfk.wav", "/v1/audio/transcriptions", model="whisper-1"
    )
    assert response.status_code == 200, response.text
    assert wer(JFK_TEXT, response.json()["text"]) == 0.0


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/big-declared", 413, "file_too_large"),
        ("/big-unannounced", 413, "file_too_large"),
        ("/lying", 413, "file_too_large"),
        ("/notes.txt", 415, "unsupported_audio"),
        ("/missing", 422, "url_http_error"),
        ("/to-metadata", 400, "url_refused"),
        ("/to-ipv6-loopback", 400, "url_refused"),
    ],
)
def test_refusals(allowing: Server, source: str, path: str, status: int, code: str) -> None:
    response = post_url(allowing, f"{source}{path}", "/api/jobs")
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert list((allowing.data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("ftp://example.org/jfk.wav", 400, "invalid_url"),
        ("file:///etc/passwd", 400, "invalid_url"),
        ("http://", 400, "invalid_url"),
        ("http://169.254.169.254/latest/meta-data/", 400, "url_refused"),
        ("http://127.0.0.2/x.wav", 400, "url_refused"),
        ("http://127.0.0.1:{closed}/x.wav", 422, "url_unreachable"),
    ],
)
def test_bad_urls(allowing: Server, url: str, status: int, code: str) -> None:
    response = post_url(allowing, url.format(closed=free_port()), "/api/jobs")
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_file_and_url_together_is_refused(allowing: Server, source: str, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{allowing.url}/api/jobs",
            files={"file": ("jfk.wav", f)},
            data={"url": f"{source}/jfk.wav"},
            timeout=60,
        )
    assert response.status_code == 400
    assert "not both" in response.json()["error"]["message"]
    assert list((allowing.data_dir / "tmp").iterdir()) == []


def test_loopback_url_is_refused_by_default(tmp_path: Path, source: str) -> None:
    srv = start_server(tmp_path / "data")
    try:
        response = post_url(srv, f"{source}/jfk.wav", "/api/jobs")
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "url_refused"
        assert "127.0.0.1 is a loopback address" in error["message"]
    finally:
        stop_server(srv)
