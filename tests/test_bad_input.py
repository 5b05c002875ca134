"""Bad input on every upload path: a 4xx JSON error, no temp file left, server still healthy."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

LIMIT = 2_000_000


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("bad") / "data", env={"MAX_UPLOAD_SIZE": str(LIMIT)})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory, clips: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("samples")
    wav = (clips / "jfk.wav").read_bytes()
    mp3 = (clips / "jfk.mp3").read_bytes()
    files = {
        "empty.wav": b"",
        "truncated.wav": wav[:40],  # RIFF header, no samples
        "truncated.mp3": mp3[:200],
        "text.wav": b"this is not audio at all, just text renamed to .wav\n" * 20,
        "random.mp3": bytes(range(256)) * 40,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    huge = d / "huge.wav"
    subprocess.run(
        [
            "sox",
            "-n",
            "-r",
            "16000",
            "-b",
            "16",
            "-c",
            "1",
            str(huge),
            "synth",
            "90",
            "sine",
            "440",
        ],
        check=True,
    )
    assert huge.stat().st_size > LIMIT
    return {name: d / name for name in [*files, "huge.wav"]}


def assert_json_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code


def assert_clean(server: Server) -> None:
    assert list((server.data_dir / "tmp").iterdir()) == []
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.output()


ROUTES = ["/transcribe", "/api/jobs", "/v1/audio/transcriptions"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("empty.wav", 400, "empty_file"),
        ("truncated.wav", 415, "unsupported_audio"),
        ("truncated.mp3", 415, "unsupported_audio"),
        ("text.wav", 415, "unsupported_audio"),
        ("random.mp3", 415, "unsupported_audio"),
        ("huge.wav", 413, "file_too_large"),
    ],
)
def test_bad_files(
    small_server: Server, samples: dict[str, Path], route: str, name: str, status: int, code: str
) -> None:
    with samples[name].open("rb") as f:
        response = httpx.post(
            f"{small_server.url}{route}",
            files={"file": (name, f)},
            data={"model": "whisper-1"} if route.startswith("/v1") else {},
            timeout=60,
        )
    assert_json_error(response, status, code)
    assert_clean(small_server)


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"model": "no-such-model"}, 404, "model_not_found"),
        ({"model": "../../etc/passwd"}, 404, "model_not_found"),
        ({"model": "large-v3"}, 409, "model_not_available"),
        ({"language": "klingon"}, 400, "invalid_language"),
        ({"task": "summarise"}, 400, "invalid_task"),
        ({"format": "docx"}, 400, "invalid_format"),
        ({"word_timestamps": "perhaps"}, 400, "invalid_request"),
    ],
)
def test_bad_fields(
    small_server: Server, jfk_wav: Path, fields: dict[str, str], status: int, code: str
) -> None:
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{small_server.url}/transcribe",
            files={"file": ("jfk.wav", f)},
            data=fields,
            timeout=60,
        )
    assert_json_error(response, status, code)
    assert_clean(small_server)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"model": "whisper-1", "response_format": "xml"}, "invalid_response_format"),
        ({"response_format": "json"}, "invalid_request"),  # model is required
        ({"model": "whisper-1", "temperature": "hot"}, "invalid_request"),
        ({"model": "whisper-1", "temperature": "7"}, "invalid_request"),
        ({"model": "whisper-1", "timestamp_granularities[]": "word"}, "invalid_request"),
    ],
)
def test_bad_openai_fields(
    small_server: Server, jfk_wav: Path, fields: dict[str, str], code: str
) -> None:
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{small_server.url}/v1/audio/transcriptions",
            files={"file": ("jfk.wav", f)},
            data=fields,
            timeout=60,
        )
    assert_json_error(response, 400, code)
    assert_clean(small_server)


def test_hostile_file_name_is_sanitised(small_server: Server, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{small_server.url}/transcribe",
            files={"file": ("../../etc/passwd\x00.wav", f)},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    entry = httpx.get(f"{small_server.url}/api/history/{response.json()['id']}", timeout=10).json()
    assert "/" not in entry["filename"]
    assert entry["filename"].startswith("passwd")
    # A raw body with a real NUL, control characters and a Windows path in the name.
    wav = jfk_wav.read_bytes()
    body = (
        b'--abc\r\nContent-Disposition: form-data; name="file"; '
        b'filename="..\\..\\win\x01dows\\sys\x7ftem.wav"\r\n\r\n' + wav + b"\r\n--abc--\r\n"
    )
    response = httpx.post(
        f"{small_server.url}/transcribe",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=abc"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    entry = httpx.get(f"{small_server.url}/api/history/{response.json()['id']}", timeout=10).json()
    assert entry["filename"] == "windowssystem.wav"  # quoted-string escapes, controls gone
    assert_clean(small_server)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b'{"file": "x"}', 415, "unsupported_media_type"),
        ("multipart/form-data", b"--x\r\n", 415, "unsupported_media_type"),  # no boundary
        ("multipart/form-data; boundary=abc", b"", 400, "malformed_multipart"),
        (
            "multipart/form-data; boundary=abc",
            b"--abc\r\nContent-Dispo",
            400,
            "malformed_multipart",
        ),
        (
            "multipart/form-data; boundary=abc",
            b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF',
            400,
            "malformed_multipart",
        ),
        (
            "multipart/form-data; boundary=abc",
            b'--abc\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny.en\r\n--abc--\r\n',
            400,
            "missing_file",
        ),
    ],
)
def test_malformed_bodies(
    small_server: Server, content_type: str, body: bytes, status: int, code: str
) -> None:
    response = httpx.post(
        f"{small_server.url}/transcribe",
        content=body,
        headers={"Content-Type": content_type},
        timeout=60,
    )
    assert_json_error(response, status, code)
    assert_clean(small_server)


def read_response(sock: socket.socket) -> str:
    """Read one HTTP response (headers + Content-Length body) without waiting for close."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += sock.recv(4096)
    return (head + b"\r\n\r\n" + body).decode()


def test_declared_length_over_limit_is_refused_before_reading(small_server: Server) -> None:
    host, port = small_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /transcribe HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=abc\r\n"
            b"Content-Length: 999999999\r\n\r\n--abc\r\n"
        )
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413")
    assert "file_too_large" in reply
    assert_clean(small_server)


def test_client_disconnect_mid_upload_leaves_nothing(small_server: Server) -> None:
    host, port = small_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /transcribe HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 1000000\r\n\r\n"
            b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + b"\0"
            * 50_000
        )
    import time

    deadline = time.monotonic() + 10
    while list((small_server.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_clean(small_server)


def test_unknown_routes_and_methods_are_json(small_server: Server) -> None:
    assert_json_error(httpx.get(f"{small_server.url}/nope", timeout=10), 404)
    assert_json_error(httpx.get(f"{small_server.url}/transcribe", timeout=10), 405)
    assert_json_error(httpx.get(f"{small_server.url}/api/history?limit=abc", timeout=10), 400)
    assert_json_error(httpx.get(f"{small_server.url}/api/history?limit=100000", timeout=10), 400)
