"""Webhooks (issue 15) on a real server: a local receiver verifies the HMAC signature, a
flaky one gets its third attempt after backoff-shaped waits, a delivery survives a restart,
and loopback, link-local and the appliance's own addresses are refused unless allowed."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from quart import Quart

from appliance.system.config import Settings
from appliance.web import outbound, webhooks
from tests.conftest import JFK_TEXT, ON_POSTGRES, Server, start_server, stop_server
from tests.pgserver import PgServer
from tests.test_admin import Admin
from tests.test_auth import admin_password, login
from tests.wer import wer

ALLOW_LOOPBACK = {
    "OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32",
    "WEBHOOK_RETRY_SECONDS": "0.4",
    "WEBHOOK_MAX_ATTEMPTS": "4",
}


@dataclass
class Hit:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    hits: list[Hit] = field(default_factory=list)
    # path -> statuses to answer in turn (the last one repeats)
    script: dict[str, list[int]] = field(default_factory=dict)

    def wait(self, path: str, count: int, timeout: float = 60) -> list[Hit]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [h for h in self.hits if h.path == path]
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len(self.hits)} hit(s), wanted {count}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.hits.append(Hit(time.monotonic(), self.path, dict(self.headers), body))
            statuses = state.script.get(self.path, [204])
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def allowing_db(pg_server: PgServer | None) -> str:
    """The database of `allowing` ("" on SQLite): its own, as it outlives each test's."""
    return pg_server.new_database() if pg_server is not None else ""


@pytest.fixture(scope="module")
def allowing(tmp_path_factory: pytest.TempPathFactory, allowing_db: str) -> Iterator[Server]:
    """A server that may call back to 127.0.0.1 (where the tests' receivers live)."""
    env = {**ALLOW_LOOPBACK, "DATABASE_URL": allowing_db} if allowing_db else ALLOW_LOOPBACK
    srv = start_server(tmp_path_factory.mktemp("webhooks") / "data", env=env)
    yield srv
    stop_server(srv)


def webhook_secret(data_dir: Path, database_url: str) -> str:
    """Where the appliance keeps it: the cluster's database on PostgreSQL, else DATA_DIR."""
    if database_url:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT value FROM auth_secrets WHERE name = 'webhook'").fetchone()
        assert row is not None
        assert not (data_dir / webhooks.SECRET_FILE).exists()
        return str(row[0])
    path = data_dir / webhooks.SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


def post_job(server: Server, wav: Path, route: str = "/api/jobs", **fields: str) -> httpx.Response:
    with wav.open("rb") as f:
        return httpx.post(
            f"{server.url}{route}", files={"file": (wav.name, f)}, data=fields, timeout=120
        )


def wait_for_line(server: Server, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.output():
        assert time.monotonic() < deadline, f"{text!r} not logged: {server.output()[-2000:]}"
        time.sleep(0.1)


def job_when(server: Server, job_id: str, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=10).json()
        if done(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {job}")


def verify(secret: str, hit: Hit, tolerance: float = 300) -> dict[str, Any]:
    """What a receiver does (the README's recipe)."""
    timestamp = hit.headers["X-Whisper-Timestamp"]
    assert abs(time.time() - int(timestamp)) <= tolerance, "replayed or clock skew"
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + hit.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(hit.headers["X-Whisper-Signature"], f"sha256={expected}")
    body: dict[str, Any] = json.loads(hit.body)
    return body


def test_signed_result_is_delivered(
    allowing: Server, allowing_db: str, receiver: Receiver, jfk_wav: Path
) -> None:
    response = post_job(allowing, jfk_wav, callback_url=f"{receiver.url}/ok")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    (hit,) = receiver.wait("/ok", 1)
    secret = webhook_secret(allowing.data_dir, allowing_db)
    assert len(secret) == 64
    body = verify(secret, hit)
    assert body["event"] == "job.finished"
    assert body["job_id"] == job_id and body["state"] == "done"
    assert wer(JFK_TEXT, body["result"]["text"]) == 0.0
    assert body["result"]["segments"]
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Whisper-Job"] == job_id
    assert hit.headers["Host"] == receiver.url.removeprefix("http://")
    # a forged or altered body does not verify
    with pytest.raises(AssertionError):
        verify(secret, Hit(hit.at, hit.path, hit.headers, hit.body + b" "))
    job = job_when(allowing, job_id, lambda j: j["callback_state"] == "delivered")
    (attempt,) = job["callbacks"]
    assert attempt["status"] == 204 and attempt["attempt"] == 1
    assert "error" not in attempt
    assert "webhook of job " + job_id in allowing.output()


def test_failing_receiver_gets_the_third_attempt(
    allowing: Server, allowing_db: str, receiver: Receiver, jfk_wav: Path
) -> None:
    receiver.script["/flaky"] = [500, 503, 200]
    response = post_job(allowing, jfk_wav, callback_url=f"{receiver.url}/flaky")
    job_id = response.json()["id"]
    hits = receiver.wait("/flaky", 3)
    secret = webhook_secret(allowing.data_dir, allowing_db)
    assert len({verify(secret, h)["job_id"] for h in hits}) == 1  # the same body each time
    assert [h.headers["X-Whisper-Attempt"] for h in hits] == ["1", "2", "3"]
    job = job_when(allowing, job_id, lambda j: j["callback_state"] == "delivered")
    assert [a["status"] for a in job["callbacks"]] == [500, 503, 200]
    assert [a.get("error") for a in job["callbacks"]] == ["HTTP 500", "HTTP 503", None]
    # WEBHOOK_RETRY_SECONDS=0.4: waits of 0.4 s, then 0.8 s, from one attempt's start to the
    # next (the dispatcher's own times: at the receiver a slow first request shortens the
    # gap, 0.33 s seen on a loaded CI host)
    times = [a["time"] for a in job["callbacks"]]
    first, second = times[1] - times[0], times[2] - times[1]
    assert 0.39 <= first < 0.8, first
    assert 0.79 <= second < 1.6, second
    assert second > 1.5 * first
    assert "attempt 1/4 failed: HTTP 500" in allowing.output()


def test_unreachable_receiver_is_given_up(
    allowing: Server, receiver: Receiver, jfk_wav: Path
) -> None:
    receiver.script["/down"] = [500]
    job_id = post_job(allowing, jfk_wav, callback_url=f"{receiver.url}/down").json()["id"]
    job = job_when(allowing, job_id, lambda j: j["callback_state"] == "failed")
    assert len(job["callbacks"]) == 4
    assert len(receiver.wait("/down", 4)) == 4
    assert "given up after 4 attempts" in allowing.output()


def test_callback_url_is_checked_when_the_job_is_sent(allowing: Server, jfk_wav: Path) -> None:
    for url, code in [
        ("ftp://example.org/x", "invalid_callback_url"),
        ("not a url", "invalid_callback_url"),
        ("http://169.254.169.254/latest/meta-data", "callback_url_refused"),
        ("http://[::1]:9/", "callback_url_refused"),
        ("http://0.0.0.0:9/", "callback_url_refused"),
    ]:
        response = post_job(allowing, jfk_wav, callback_url=url)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["code"] == code, url
    assert list((allowing.data_dir / "tmp").iterdir()) == []


def test_loopback_is_refused_by_default(tmp_path: Path, receiver: Receiver, jfk_wav: Path) -> None:
    srv = start_server(tmp_path / "data")
    try:
        for route in ("/api/jobs", "/transcribe"):
            response = post_job(srv, jfk_wav, route, callback_url=f"{receiver.url}/never")
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "callback_url_refused"
            assert "loopback" in error["message"]
            assert "OUTBOUND_ALLOWED_NETWORKS" in error["message"]
    finally:
        stop_server(srv)
    assert not [h for h in receiver.hits if h.path == "/never"]


def test_delivery_survives_a_restart(tmp_path: Path, receiver: Receiver, jfk_wav: Path) -> None:
    env = {**ALLOW_LOOPBACK, "WEBHOOK_RETRY_SECONDS": "30"}  # stopped long before it ends
    receiver.script["/later"] = [500, 500, 200]
    srv = start_server(tmp_path / "data", env=env)
    try:
        job_id = post_job(srv, jfk_wav, callback_url=f"{receiver.url}/later").json()["id"]
        receiver.wait("/later", 1)
        job_when(srv, job_id, lambda j: len(j["callbacks"]) == 1)
    finally:
        stop_server(srv)  # during the 30 s wait before the second attempt
    assert len(receiver.wait("/later", 1)) == 1
    srv = start_server(tmp_path / "data", env={**env, "WEBHOOK_RETRY_SECONDS": "0.2"})
    try:
        job = job_when(srv, job_id, lambda j: j["callback_state"] == "delivered")
        assert [a["status"] for a in job["callbacks"]] == [500, 500, 200]
        assert "webhook delivery(ies) from before the restart resumed" in srv.output()
    finally:
        stop_server(srv)


@pytest.mark.skipif(not ON_POSTGRES, reason="a cluster's nodes share PostgreSQL")
def test_a_node_that_starts_leaves_another_nodes_delivery_alone(
    tmp_path: Path, database_url: str, receiver: Receiver, jfk_wav: Path
) -> None:
    """Node two resumes pending deliveries at its start, as after a crash; the one node one
    is making is not made twice (node two would send its next attempt after 0.1 s, node one
    waits 1, 2, 4 ... s). The receiver fails until node two has seen the delivery is taken,
    however long node two takes to start: no race with node one's backoff."""
    receiver.script["/cluster"] = [500]
    env = {**ALLOW_LOOPBACK, "WEBHOOK_MAX_ATTEMPTS": "9"}
    one = start_server(tmp_path / "one", env={**env, "WEBHOOK_RETRY_SECONDS": "1"})
    two = None
    try:
        job_id = post_job(one, jfk_wav, callback_url=f"{receiver.url}/cluster").json()["id"]
        receiver.wait("/cluster", 1)
        job_when(one, job_id, lambda j: len(j["callbacks"]) == 1)
        two = start_server(tmp_path / "two", env={**env, "WEBHOOK_RETRY_SECONDS": "0.1"})
        wait_for_line(two, "another node is delivering it")
        receiver.script["/cluster"] = [200]
        job = job_when(one, job_id, lambda j: j["callback_state"] == "delivered", timeout=120)
        statuses = [a["status"] for a in job["callbacks"]]
        assert statuses[-1] == 200 and set(statuses[:-1]) == {500}, statuses
        hits = receiver.wait("/cluster", len(statuses))
        assert len(hits) == len(statuses)  # nothing sent twice
        assert [h.headers["X-Whisper-Attempt"] for h in hits] == [
            str(n) for n in range(1, len(hits) + 1)
        ]
        times = [a["time"] for a in job["callbacks"]]  # each attempt's start, by its node
        for n, (before, after) in enumerate(itertools.pairwise(times)):
            assert after - before >= 0.99 * 2**n  # node one's backoff, not node two's
        # every node signs with the cluster's secret
        secret = webhook_secret(two.data_dir, database_url)
        assert len({verify(secret, h)["job_id"] for h in hits}) == 1
    finally:
        for node in (two, one):
            if node is not None:
                stop_server(node)


def test_address_policy() -> None:
    default = outbound.Policy()
    ip = ipaddress.ip_address
    for refused in (
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "224.0.0.1",
        "0.0.0.0",  # noqa: S104
        "::",
        "::ffff:127.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
    ):
        assert default.refusal(ip(refused)) is not None, refused
    for allowed in ("10.1.2.3", "192.168.1.20", "172.16.0.5", "fd00::5", "8.8.8.8"):
        assert default.refusal(ip(allowed)) is None, allowed
    own = next(
        (
            a
            for a in outbound.own_addresses()
            if a.is_private and not a.is_link_local and not a.is_loopback
        ),
        None,
    )
    if own is not None:
        assert default.refusal(own) == "an address of this appliance"
    public_only = outbound.Policy(allow_private=False)
    assert public_only.refusal(ip("192.168.1.20")) is not None
    assert public_only.refusal(ip("8.8.8.8")) is None
    loopback_ok = outbound.Policy(allowed=(ipaddress.ip_network("127.0.0.1/32"),))
    assert loopback_ok.refusal(ip("127.0.0.1")) is None
    assert loopback_ok.refusal(ip("127.0.0.2")) is not None


def test_signature_recipe() -> None:
    body = b'{"job_id": "x"}'
    expected = hmac.new(b"k" * 64, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.sign("k" * 64, 1700000000, body) == f"sha256={expected}"


async def test_admin_shows_the_secret_and_default_url(app: Quart, settings: Settings) -> None:
    admin = Admin(app.test_client(), "")
    admin = Admin(admin.client, await login(admin.client, admin_password(settings)))
    code, described = await admin.call("GET", "/admin/api/settings")
    assert code == 200
    secret = webhook_secret(settings.data_dir, settings.database_url)
    assert described["webhook"]["secret"] == secret
    assert described["webhook"]["signature_header"] == "X-Whisper-Signature"
    assert described["values"]["default_callback_url"] == ""
    url = "http://homeassistant.lan:8123/api/webhook/whisper"
    code, described = await admin.call(
        "PUT", "/admin/api/settings", json={"default_callback_url": url}
    )
    assert code == 200 and described["values"]["default_callback_url"] == url
    code, body = await admin.call(
        "PUT", "/admin/api/settings", json={"default_callback_url": "file:///etc/passwd"}
    )
    assert code == 400 and body["error"]["code"] == "invalid_setting"
