"""The admin panel's update requests: the API writes the right request into the spool, refuses
bad input and a second request with clear 4xx errors (leaving nothing behind), and the root
updater's `run-request` refuses hostile spool contents without touching anything outside it.

The full path (admin API -> request -> run-request -> real releases) is in
tests/test_admin_updates_e2e.py."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.system.config import Settings
from appliance.system.update import cli as update_cli
from appliance.system.update import spool as update_spool
from appliance.system.update import updater
from appliance.system.update.updater import Config, Updater
from appliance.web.admin.update_api import MAX_BUNDLE_CONFIG
from appliance.web.app import create_app
from tests.conftest import make_settings, serve_directory
from tests.test_admin import Admin
from tests.test_auth import admin_password, login

HEX = "0123456789abcdef" * 2


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An install root with two (empty) releases, `current` -> 1.1.0, for the web side."""
    root = tmp_path / "opt"
    for version in ("1.0.0", "1.1.0"):
        (root / "releases" / version).mkdir(parents=True)
    (root / "current").symlink_to("releases/1.1.0")
    monkeypatch.setenv("UPDATER_ROOT", str(root))
    return root


@pytest.fixture
async def admin(app: Quart, settings: Settings, root: Path) -> Admin:
    client = app.test_client()
    return Admin(client, await login(client, admin_password(settings)))


def set_update_source(app: Quart, source: str) -> None:
    services = app.extensions["appliance"]
    services.settings = services.settings.model_copy(update={"update_source": source})


def spool_of(settings: Settings) -> Path:
    return settings.data_dir / update_spool.SPOOL


def request_file(settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((spool_of(settings) / update_spool.REQUEST).read_text())
    return data


def bundle_bytes() -> bytes:
    """A tar shaped like a release bundle (the web side checks only name and tar magic)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("manifest.json", "manifest.json.sig"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


def bundle(data: bytes | None = None, name: str = "whisper-appliance-1.2.0.release.tar") -> Any:
    return {"file": FileStorage(io.BytesIO(bundle_bytes() if data is None else data), name)}


# --- the API --------------------------------------------------------------------------------
async def test_state_when_idle(admin: Admin, settings: Settings) -> None:
    code, state = await admin.call("GET", "/admin/api/updates")
    assert code == 200
    assert state["releases"] == ["1.0.0", "1.1.0"]
    assert (state["state"], state["pending"], state["status"], state["history"]) == (
        "idle",
        None,
        None,
        [],
    )
    spool = spool_of(settings)
    assert spool.is_dir() and spool.stat().st_mode & 0o777 == 0o700


async def test_apply_from_a_url_then_409_while_pending(admin: Admin, settings: Settings) -> None:
    url = "https://releases.example.org/whisper/"
    code, body = await admin.call("POST", "/admin/api/updates/apply", json={"source": url})
    assert code == 202, body
    req = request_file(settings)
    assert req == body["request"]
    assert (req["action"], req["source"], req["to_version"]) == ("apply", url, None)
    assert update_spool.parse_request(json.dumps(req).encode()).id == req["id"]

    code, state = await admin.call("GET", "/admin/api/updates")
    assert (state["state"], state["pending"]) == ("pending", req)
    for method, path, kwargs in (
        ("POST", "/admin/api/updates/apply", {"json": {"source": url}}),
        ("POST", "/admin/api/updates/rollback", {"json": {}}),
        ("POST", "/admin/api/updates/upload", {"files": bundle()}),
    ):
        code, body = await admin.call(method, path, **kwargs)
        assert code == 409, body
        assert body["error"]["code"] == "update_pending"
    assert request_file(settings) == req  # the pending request is untouched
    assert sorted(p.name for p in spool_of(settings).iterdir()) == ["request.json"]


async def test_409_while_the_updater_runs(admin: Admin, settings: Settings) -> None:
    spool = update_spool.prepare(settings.data_dir)
    (spool / f"processing-{HEX[:16]}.json").write_text("{}")
    code, body = await admin.call("POST", "/admin/api/updates/rollback", json={})
    assert (code, body["error"]["code"]) == (409, "update_running")
    code, state = await admin.call("GET", "/admin/api/updates")
    assert state["state"] == "running"


async def test_apply_defaults_to_the_release_update_source_offers(
    app: Quart, admin: Admin, settings: Settings, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    release_url = "https://releases.example.org/whisper/1.2.0/"
    (www / "manifest.json").write_text(json.dumps({"version": "1.2.0", "url": release_url}))
    with serve_directory(www) as url:
        set_update_source(app, f"{url}/manifest.json")
        code, body = await admin.call("POST", "/admin/api/updates/apply", json={})
    assert code == 202, body
    assert request_file(settings)["source"] == release_url


async def test_apply_without_a_url_source_is_refused(
    app: Quart, admin: Admin, settings: Settings
) -> None:
    for source in ("", str(settings.data_dir)):  # none, or a local directory
        set_update_source(app, source)
        code, body = await admin.call("POST", "/admin/api/updates/apply", json={})
        assert (code, body["error"]["code"]) == (400, "no_update_source")
    assert update_spool.busy(spool_of(settings)) is None


async def test_upload_a_bundle(admin: Admin, settings: Settings) -> None:
    code, body = await admin.call("POST", "/admin/api/updates/upload", files=bundle())
    assert code == 202, body
    req = request_file(settings)
    assert req == body["request"]
    assert req["source"] == f"upload-{req['id']}.release.tar"
    stored = spool_of(settings) / req["source"]
    assert stored.read_bytes() == bundle_bytes()
    assert list(settings.tmp_dir.iterdir()) == []  # moved, not copied


async def test_rollback_requests(admin: Admin, settings: Settings) -> None:
    code, body = await admin.call("POST", "/admin/api/updates/rollback", json={})
    assert code == 202, body
    req = request_file(settings)
    assert (req["action"], req["source"], req["to_version"]) == ("rollback", None, None)
    (spool_of(settings) / update_spool.REQUEST).unlink()
    code, body = await admin.call(
        "POST", "/admin/api/updates/rollback", json={"to_version": "1.0.0"}
    )
    assert code == 202, body
    assert request_file(settings)["to_version"] == "1.0.0"


# --- bad input ------------------------------------------------------------------------------
def _nothing_left(settings: Settings) -> None:
    assert update_spool.busy(spool_of(settings)) is None
    leftovers = [p.name for p in spool_of(settings).iterdir()]
    assert leftovers == [], leftovers
    assert list(settings.tmp_dir.iterdir()) == []


BAD_APPLY: list[dict[str, Any]] = [
    {"data": b""},
    {"data": b"source=http://x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
    {"json": []},
    {"json": "http://example.org/"},
    {"json": {"source": 5}},
    {"json": {"source": ""}},
    {"json": {"source": ["http://example.org/"]}},
    {"json": {"source": "file:///etc/shadow"}},
    {"json": {"source": "/etc/shadow"}},
    {"json": {"source": "../../etc/shadow"}},
    {"json": {"source": f"upload-{HEX}.release.tar"}},  # only the upload route names uploads
    {"json": {"source": "ftp://example.org/release/"}},
    {"json": {"source": "http://"}},
    {"json": {"source": "http://exa mple.org/"}},
    {"json": {"source": "http://example.org/\nX: y"}},
    {"json": {"source": "http://user:secret@example.org/"}},
    {"json": {"source": "http://example.org:99999/"}},
    {"json": {"source": "https://example.org/" + "a" * 3000}},
    {"json": {"source": "https://example.org/", "extra": 1}},
]


@pytest.mark.parametrize("kwargs", BAD_APPLY, ids=range(len(BAD_APPLY)))
async def test_bad_apply(admin: Admin, settings: Settings, kwargs: dict[str, Any]) -> None:
    code, body = await admin.call("POST", "/admin/api/updates/apply", **kwargs)
    assert 400 <= code < 500 and code != 409, (code, body)
    assert body["error"]["code"] and body["error"]["message"]
    _nothing_left(settings)


BAD_ROLLBACK: list[dict[str, Any]] = [
    {"data": b""},
    {"json": None},
    {"json": {"to_version": 1}},
    {"json": {"to_version": ""}},
    {"json": {"to_version": "../../etc"}},
    {"json": {"to_version": "1.0.0; rm -rf /"}},
    {"json": {"to_version": "9.9.9"}},  # not installed
    {"json": {"to_version": "1.0.0", "source": "http://example.org/"}},
]


@pytest.mark.parametrize("kwargs", BAD_ROLLBACK, ids=range(len(BAD_ROLLBACK)))
async def test_bad_rollback(admin: Admin, settings: Settings, kwargs: dict[str, Any]) -> None:
    code, body = await admin.call("POST", "/admin/api/updates/rollback", **kwargs)
    assert 400 <= code < 500 and code != 409, (code, body)
    assert body["error"]["code"] and body["error"]["message"]
    _nothing_left(settings)


BAD_UPLOADS: list[tuple[str, dict[str, Any], int]] = [
    ("no multipart", {"json": {"file": "x"}}, 415),
    ("wrong field", {"files": {"bundle": bundle()["file"]}}, 400),
    ("empty file", {"files": bundle(b"")}, 400),
    ("not a tar", {"files": bundle(b"PK\x03\x04" + b"\0" * 600)}, 400),
    ("a .tar", {"files": bundle(name="release.tar")}, 400),
    ("no name", {"files": bundle(name="")}, 400),
    ("only a suffix", {"files": bundle(name=".release.tar")}, 400),
    ("markup", {"files": bundle(name="<script>.release.tar")}, 400),
    ("spaces", {"files": bundle(name="a b.release.tar")}, 400),
    ("too long", {"files": bundle(name="a" * 250 + ".release.tar")}, 400),
    ("oversize", {"files": bundle(b"\0" * 300_000)}, 413),
]


@pytest.mark.parametrize(("what", "kwargs", "status"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
async def test_bad_upload(
    app: Quart, admin: Admin, settings: Settings, what: str, kwargs: dict[str, Any], status: int
) -> None:
    app.config[MAX_BUNDLE_CONFIG] = 200_000
    code, body = await admin.call("POST", "/admin/api/updates/upload", **kwargs)
    assert code == status, (what, code, body)
    assert body["error"]["code"] and body["error"]["message"]
    _nothing_left(settings)


async def test_updates_need_login_and_csrf(app: Quart, admin: Admin, settings: Settings) -> None:
    anonymous = app.test_client()
    response = await anonymous.get("/admin/api/updates")
    assert response.status_code == 401
    response = await anonymous.post("/admin/api/updates/rollback", json={})
    assert response.status_code == 401
    no_csrf = Admin(admin.client, "wrong")
    code, body = await no_csrf.call("POST", "/admin/api/updates/rollback", json={})
    assert (code, body["error"]["code"]) == (403, "csrf_failed")
    _nothing_left(settings)


# --- run-request against hostile spool contents ---------------------------------------------
@pytest.fixture
def host(tmp_path: Path) -> tuple[Updater, Path]:
    """The root side on an empty install root (nothing to update: the request is the test)."""
    data = tmp_path / "data"
    data.mkdir()
    cfg = Config(
        root=tmp_path / "opt",
        data_dir=data,
        key_dir=tmp_path / "keys",
        restart_command="false",
        stop_command="false",
    )
    return Updater(cfg), update_spool.prepare(data)


def _run(upd: Updater) -> tuple[int, dict[str, Any]]:
    code = update_cli.run_request(upd)
    status = update_spool.read_status(upd.cfg.spool_dir)
    assert status is not None
    spool = upd.cfg.spool_dir
    assert [p.name for p in spool.iterdir() if p.name != "status.json"] == []  # all consumed
    return code, status


def _request(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "id": HEX,
        "action": "apply",
        "source": "https://example.org/",
        "to_version": None,
        "requested_at": 1.0,
    }
    return json.dumps({**base, **fields}).encode()


HOSTILE: list[tuple[str, bytes, str]] = [
    ("not json", b"{", "not valid JSON"),
    ("a list", b"[]", "not a JSON object"),
    ("oversize", _request(pad="x" * 10_000), "larger than"),
    ("unknown field", _request(pad="x"), "unknown request fields"),
    ("unknown action", _request(action="shell"), "unknown action"),
    ("bad id", _request(id="../../x"), "request id"),
    ("bad version", _request(action="rollback", source=None, to_version="1/../.."), "version"),
    ("path source", _request(source="/etc/shadow"), "source"),
    ("relative path", _request(source="../../etc/shadow"), "http"),
    ("other spool file", _request(source="status.json"), "upload-<hex>"),
    ("file url", _request(source="file:///etc/shadow"), "http"),
    ("no source", _request(source=None), "needs a source"),
    ("rollback with source", _request(action="rollback"), "no source"),
    ("bool time", _request(requested_at=True), "requested_at"),
]


@pytest.mark.parametrize(("what", "raw", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_run_request_refuses_hostile_requests(
    host: tuple[Updater, Path], what: str, raw: bytes, reason: str
) -> None:
    upd, spool = host
    (spool / "request.json").write_bytes(raw)
    code, status = _run(upd)
    assert code == updater.EXIT_OK  # handled: the unit does not fail
    assert status["state"] == "refused", status
    assert reason in status["message"], status
    row = upd.history()[0]
    assert (row["status"], row["action"]) == ("refused", "request")
    assert not (upd.cfg.root / "releases").exists()


def test_run_request_refuses_a_symlinked_request(
    host: tuple[Updater, Path], tmp_path: Path
) -> None:
    upd, spool = host
    secret = tmp_path / "secret.json"
    secret.write_bytes(_request())
    (spool / "request.json").symlink_to(secret)
    code, status = _run(upd)
    assert (code, status["state"]) == (updater.EXIT_OK, "refused")
    assert "not a regular file" in status["message"]
    assert secret.read_bytes() == _request()  # the link's target is untouched


def test_run_request_refuses_a_directory_request(host: tuple[Updater, Path]) -> None:
    upd, spool = host
    (spool / "request.json").mkdir()
    (spool / "request.json" / "x").write_text("x")
    code, status = _run(upd)
    assert (code, status["state"]) == (updater.EXIT_OK, "refused")


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "missing", "directory"])
def test_run_request_refuses_hostile_uploads(
    host: tuple[Updater, Path], tmp_path: Path, kind: str
) -> None:
    upd, spool = host
    outside = tmp_path / "outside.release.tar"
    outside.write_bytes(bundle_bytes())
    name = f"upload-{HEX}.release.tar"
    if kind == "symlink":
        (spool / name).symlink_to(outside)
    elif kind == "hardlink":
        os.link(outside, spool / name)
    elif kind == "fifo":
        os.mkfifo(spool / name)
    elif kind == "directory":
        (spool / name).mkdir()
    (spool / "request.json").write_bytes(_request(source=name))
    code, status = _run(upd)
    assert (code, status["state"]) == (updater.EXIT_OK, "refused"), status
    assert outside.read_bytes() == bundle_bytes()
    row = upd.history()[0]
    assert (row["status"], row["request_id"], row["source"]) == ("refused", HEX, name)


def test_run_request_refuses_a_symlinked_spool(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "request.json").write_bytes(_request())
    (data / update_spool.SPOOL).symlink_to(elsewhere)
    upd = Updater(Config(root=tmp_path / "opt", data_dir=data))
    assert update_cli.run_request(upd) == updater.EXIT_FAILED
    assert (elsewhere / "request.json").read_bytes() == _request()


def test_run_request_with_nothing_to_do(host: tuple[Updater, Path]) -> None:
    upd, spool = host
    assert update_cli.run_request(upd) == updater.EXIT_OK
    assert list(spool.iterdir()) == []


def test_a_crashed_run_is_reported_as_failed(host: tuple[Updater, Path]) -> None:
    """A processing file left by a crash or a reboot: the next run reports and removes it."""
    upd, spool = host
    name = f"upload-{HEX}.release.tar"
    (spool / name).write_bytes(bundle_bytes())
    (spool / "processing-0123456789abcdef.json").write_bytes(_request(source=name))
    code, status = _run(upd)
    assert code == updater.EXIT_OK
    assert (status["id"], status["state"]) == (HEX, "failed")
    assert "interrupted" in status["message"]


async def test_start_removes_uploads_no_request_refers_to(tmp_path: Path) -> None:
    """A crash between upload and request leaves a bundle; the next start removes it, but
    never the bundle of a request that is still pending."""
    data = tmp_path / "data"
    spool = data / update_spool.SPOOL
    spool.mkdir(parents=True)
    orphan = spool / update_spool.upload_name(HEX)
    orphan.write_bytes(b"x")
    app = create_app(make_settings(data))
    async with app.test_app():
        pass
    assert not orphan.exists()
    assert spool.stat().st_mode & 0o777 == 0o700

    orphan.write_bytes(b"x")
    (spool / update_spool.REQUEST).write_bytes(_request(source=orphan.name))
    app = create_app(make_settings(data))
    async with app.test_app():
        pass
    assert orphan.exists()


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"HTTPS_PORT": "5001"}, "https://127.0.0.1:5001"),
        (
            {"HTTPS_PORT": "8443", "HTTPS_ENABLED": "false", "BIND_ADDRESS": "0.0.0.0"},  # noqa: S104
            "http://127.0.0.1:8443",
        ),
        ({"HTTPS_PORT": "5001", "BIND_ADDRESS": "10.0.0.5"}, "https://10.0.0.5:5001"),
        ({"HTTPS_PORT": "5001", "BIND_ADDRESS": "::"}, "https://[::1]:5001"),
        (
            {"HTTPS_PORT": "5001", "UPDATER_URL": "https://appliance.lan:5001"},
            "https://appliance.lan:5001",
        ),
    ],
)
def test_run_request_finds_the_service_from_its_env_file(env: dict[str, str], url: str) -> None:
    """The unit reads the service's env file: the updater checks the service where it listens."""
    cfg = Config.from_env(env)
    assert cfg.url == url
    assert cfg.verify_tls is ("UPDATER_URL" in env)
