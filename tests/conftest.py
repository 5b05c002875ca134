"""Shared fixtures: real clips, real settings in a temp data dir, the app with its test
client, and a real `whisper-appliance serve` (Hypercorn) on a free port.

`APPLIANCE_TEST_DB=postgresql` runs the same tests on PostgreSQL (`make pytest-pg`): one
throw-away server for the session (`tests/pgserver.py`) and an empty database for each test,
handed to the app as `DATABASE_URL`. Tests about the SQLite file itself are marked
`sqlite_only` and skipped there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from quart import Quart
from quart.typing import TestClientProtocol

from appliance.system.config import Settings
from appliance.web.app import create_app
from tests.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / ".cache" / "clips"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@pytest.fixture(scope="session")
def clips() -> Path:
    if not (CLIPS / "jfk.wav").is_file():
        pytest.fail("speech clips missing: run `make setup` (scripts/bootstrap.sh)")
    return CLIPS


@pytest.fixture(scope="session")
def jfk_wav(clips: Path) -> Path:
    return clips / "jfk.wav"


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """A local HTTP server over `root` (a stand-in for the model hub); yields its base URL."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


BACKEND = os.environ.get("APPLIANCE_TEST_DB", "sqlite")
ON_POSTGRES = BACKEND == "postgresql"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ON_POSTGRES:
        skip = pytest.mark.skip(
            reason="about the SQLite file itself (APPLIANCE_TEST_DB=postgresql)"
        )
        for item in items:
            if "sqlite_only" in item.keywords:
                item.add_marker(skip)


def pytest_report_header() -> str:
    return f"database backend: {BACKEND}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer | None]:
    """The session's PostgreSQL server (None on SQLite)."""
    if not ON_POSTGRES:
        yield None
        return
    server = PgServer.start(free_port())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_pg(pg_server: PgServer | None) -> Iterator[PgServer]:
    """A PostgreSQL server for the tests that need one on either backend (the cluster's, two
    nodes on one database): the session's on PostgreSQL, else one started for them."""
    if pg_server is not None:
        yield pg_server
        return
    server = PgServer.start(free_port())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def database_url(pg_server: PgServer | None, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty PostgreSQL database for this test as DATABASE_URL (servers started by the test
    inherit it); "" on SQLite."""
    if pg_server is None:
        return ""
    url = pg_server.new_database()
    monkeypatch.setenv("DATABASE_URL", url)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": data_dir,
        "https_enabled": False,
        "bind_address": "127.0.0.1",
        "worker_processes": 2,
        "database_url": os.environ.get("DATABASE_URL", "") if ON_POSTGRES else "",
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Quart]:
    application = create_app(settings)
    async with application.test_app():
        services = application.extensions["appliance"]
        await services.warmed_up()
        yield application


@pytest.fixture
def client(app: Quart) -> TestClientProtocol:
    return app.test_client()


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(data_dir: Path, env: dict[str, str] | None = None, timeout: float = 60) -> Server:
    """`whisper-appliance serve` in a subprocess, waiting until /health is green."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    speaker_model = ROOT / ".cache" / "speaker" / "models" / "speaker-ge2e.npz"
    if speaker_model.is_file():  # diarize=true works as on an installed appliance
        (data_dir / "models").mkdir(exist_ok=True)
        shutil.copyfile(speaker_model, data_dir / "models" / speaker_model.name)
    log = data_dir.parent / f"server-{port}.log"
    full_env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HTTPS_ENABLED": "false",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTPS_PORT": str(port),
        "WORKER_PROCESSES": "2",
        **(env or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve"], env=full_env, stdout=out, stderr=out
        )
    scheme = "https" if full_env["HTTPS_ENABLED"] == "true" else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2, verify=False).status_code == 200:  # noqa: S501
                return Server(url, data_dir, process, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer | None
) -> Iterator[Server]:
    """One real Hypercorn server for the whole session (plain HTTP), with its own database."""
    env = {"DATABASE_URL": pg_server.new_database()} if pg_server is not None else {}
    srv = start_server(tmp_path_factory.mktemp("server") / "data", env)
    yield srv
    stop_server(srv)
