"""The admin API with a logged-in session: status, models (download from a stand-in hub,
import, load, default, delete), runtime settings, logs, API keys and the update check."""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.core.model_manager import CATALOGUE
from appliance.system.config import Settings
from appliance.web.app import create_app
from tests.conftest import make_settings as make_settings
from tests.conftest import serve_directory
from tests.test_auth import admin_password, login

if TYPE_CHECKING:
    from quart.typing import TestClientProtocol


class Admin:
    """A logged-in test client that adds the CSRF token."""

    def __init__(self, client: TestClientProtocol, csrf: str) -> None:
        self.client = client
        self.csrf = csrf

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {"X-CSRF-Token": self.csrf, **kwargs.pop("headers", {})}
        response = await self.client.open(path, method=method, headers=headers, **kwargs)
        body = await response.get_data(as_text=True)
        return response.status_code, json.loads(body) if body else None


@pytest.fixture
async def admin(app: Quart, settings: Settings) -> Admin:
    client = app.test_client()
    return Admin(client, await login(client, admin_password(settings)))


def fake_model_files() -> dict[str, bytes]:
    return {"model.bin": b"\0" * 4096, "config.json": b"{}", "tokenizer.json": b"{}"}


def model_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in fake_model_files().items():
            info = tarfile.TarInfo(f"my-model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(data: bytes, filename: str) -> FileStorage:
    return FileStorage(io.BytesIO(data), filename=filename, content_type="application/gzip")


async def test_status(admin: Admin) -> None:
    code, status = await admin.call("GET", "/admin/api/status")
    assert code == 200
    assert status["default_model"] == "tiny.en"
    assert status["loaded_models"][0]["name"] == "tiny.en"
    assert status["loaded_models"][0]["ram_mb"] >= 0
    for key in ("version", "uptime_seconds", "engine", "queue", "running_jobs", "recent_errors"):
        assert key in status
    assert {"cpu_percent", "ram_available_mb", "disk_free_mb"} <= set(status["system"])


async def test_switch_the_default_model(app: Quart, admin: Admin) -> None:
    code, settings = await admin.call("PUT", "/admin/api/settings", json={"default_model": "base"})
    assert code == 200
    assert settings["values"]["default_model"] == "base"
    assert settings["overridden"] == ["default_model"]
    services = app.extensions["appliance"]
    assert services.runtime.default_model == "base"
    await services.warmed_up()
    assert "base" in services.models.loaded
    public = await (await app.test_client().get("/api/status")).get_json()
    assert public["default_model"] == "base"
    # setting it back to the env default removes the override
    code, settings = await admin.call(
        "PUT", "/admin/api/settings", json={"default_model": "tiny.en"}
    )
    assert code == 200 and settings["overridden"] == []
    code, body = await admin.call("PUT", "/admin/api/settings", json={"default_model": "small"})
    assert code == 409 and "download or import it first" in body["error"]["message"]


async def test_runtime_settings_persist_and_apply(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    changes = {
        "default_language": "de",
        "max_upload_size": "2MB",
        "history_retention_days": 30,
        "history_max_rows": 1000,
        "live_max_sessions": 2,
        "live_max_minutes": 15,
        "require_api_key": False,
        "allowed_origins": "https://a.example, http://b.example:8080",
    }
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        admin = Admin(client, await login(client, admin_password(settings)))
        code, body = await admin.call("PUT", "/admin/api/settings", json=changes)
        assert code == 200, body
    app = create_app(settings)  # a restart reads them back from the database
    async with app.test_app():
        services = app.extensions["appliance"]
        runtime = services.runtime
        assert runtime.default_language == "de"
        assert runtime.max_upload_size == 2_000_000
        assert services.history.retention_days == 30
        assert services.history.max_rows == 1000
        assert runtime.live_max_sessions == 2 and runtime.live_max_minutes == 15
        assert runtime.allowed_origins == ("http://b.example:8080", "https://a.example")
        # the runtime upload limit applies to /transcribe
        big = FileStorage(io.BytesIO(b"\0" * 2_100_000), filename="a.wav")
        response = await app.test_client().post("/transcribe", files={"file": big})
        assert response.status_code == 413


@pytest.fixture
def stand_in_hub(tmp_path: Path) -> Iterator[str]:
    """Serves a (fake) `tiny` model the way the model hub does."""
    root = tmp_path / "hub"
    repo = root / CATALOGUE["tiny"].repo / "resolve" / "main"
    repo.mkdir(parents=True)
    for name, data in fake_model_files().items():
        (repo / name).write_bytes(data)
    with serve_directory(root) as url:
        yield url


@pytest.fixture
async def hub_app(tmp_path: Path, stand_in_hub: str) -> AsyncIterator[Quart]:
    settings = make_settings(tmp_path / "data", model_hub_url=stand_in_hub)
    app = create_app(settings)
    async with app.test_app():
        yield app


async def _model(admin: Admin, name: str) -> dict[str, Any]:
    _, body = await admin.call("GET", "/admin/api/models")
    model: dict[str, Any] = next(m for m in body["models"] if m["name"] == name)
    return model


async def test_download_import_load_and_delete_models(hub_app: Quart) -> None:
    client = hub_app.test_client()
    admin = Admin(client, await login(client, admin_password(hub_app.extensions["settings"])))
    assert (await _model(admin, "tiny"))["state"] == "not_downloaded"
    code, body = await admin.call("POST", "/admin/api/models/tiny/download")
    assert code == 202 and body["state"] == "downloading"
    for _ in range(100):
        if (await _model(admin, "tiny"))["state"] == "available":
            break
        await asyncio.sleep(0.05)
    assert (await _model(admin, "tiny"))["state"] == "available"

    files = {"file": upload(model_archive(), "my-model.tar.gz")}
    code, body = await admin.call(
        "POST", "/admin/api/models/import", form={"name": "my-model"}, files=files
    )
    assert code == 201, body
    assert (await _model(admin, "my-model"))["state"] == "available"

    code, _ = await admin.call("POST", "/admin/api/models/base/load")
    assert code == 202
    await asyncio.gather(*hub_app.background_tasks)  # the admin API's downloads and loads
    assert (await _model(admin, "base"))["state"] == "loaded"

    for name in ("tiny", "my-model"):
        code, _ = await admin.call("DELETE", f"/admin/api/models/{name}")
        assert code == 200
    assert (await _model(admin, "tiny"))["state"] == "not_downloaded"
    code, body = await admin.call("DELETE", "/admin/api/models/tiny.en")
    assert code == 409 and body["error"]["code"] == "model_is_default"


async def test_log_tail_with_level_filter(app: Quart, admin: Admin) -> None:
    anonymous = app.test_client()
    await anonymous.get("/admin/login")
    await anonymous.post("/admin/api/login", json={"password": "x"})  # no CSRF: refused
    token_page = await anonymous.get("/admin/login")
    assert token_page.status_code == 200
    logging_line = "failed admin login"
    token = re.search(r'csrf-token" content="([^"]+)"', await token_page.get_data(as_text=True))
    assert token
    await anonymous.post(
        "/admin/api/login", json={"password": "wrong!"}, headers={"X-CSRF-Token": token.group(1)}
    )
    code, body = await admin.call("GET", "/admin/api/logs?level=WARNING&lines=50")
    assert code == 200
    assert body["entries"], "no warnings in the log tail"
    assert all(e["level"] in ("WARNING", "ERROR", "CRITICAL") for e in body["entries"])
    assert any(logging_line in e["msg"] for e in body["entries"])
    code, body = await admin.call("GET", "/admin/api/logs?level=INFO&lines=500")
    assert any(e["level"] == "INFO" for e in body["entries"])
    assert all(e["request_id"] for e in body["entries"])
    assert any(e["logger"] == "appliance.access" for e in body["entries"])


async def test_api_keys_listing(admin: Admin) -> None:
    code, created = await admin.call("POST", "/admin/api/keys", json={"name": "transcriber"})
    assert code == 201
    code, listing = await admin.call("GET", "/admin/api/keys")
    row = listing["keys"][0]
    assert row["name"] == "transcriber" and row["prefix"] == created["prefix"]
    assert "key" not in row and "key_hash" not in row
    assert row["last_used"] is None and row["revoked"] is None
    code, _ = await admin.call("DELETE", f"/admin/api/keys/{row['id']}")
    assert code == 200
    code, listing = await admin.call("GET", "/admin/api/keys")
    assert listing["keys"][0]["revoked"] is not None
    code, _ = await admin.call("DELETE", f"/admin/api/keys/{row['id']}")
    assert code == 404


@pytest.mark.parametrize(
    ("manifest", "available", "latest"),
    [
        ({"version": "99.0.0", "notes": "big one", "url": "https://example.org/r"}, True, "99.0.0"),
        ({"version": "0.0.1"}, False, "0.0.1"),
        ({"releases": [{"version": "1.0.0rc1"}, {"version": "98.1"}, {"bad": 1}]}, True, "98.1"),
    ],
)
async def test_check_updates_from_a_local_manifest(
    tmp_path: Path, manifest: dict[str, Any], available: bool, latest: str
) -> None:
    source = tmp_path / "updates"
    source.mkdir()
    (source / "manifest.json").write_text(json.dumps(manifest))
    settings = make_settings(tmp_path / "data", update_source=str(source))
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        assert (await client.get("/admin/check-updates")).status_code == 401
        await login(client, admin_password(settings))
        body = await (await client.get("/admin/check-updates")).get_json()
    assert body["update_available"] is available
    assert body["latest_version"] == latest
    assert body["current_version"] and body["error"] is None


async def test_check_updates_reports_problems(tmp_path: Path, admin: Admin) -> None:
    code, body = await admin.call("GET", "/admin/check-updates")
    assert code == 200 and body["update_available"] is False
    assert "no update source" in body["error"]
    from appliance.web.admin import updates

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = await updates.check(str(broken), "0.1.0")
    assert result["error"] and not result["update_available"]
    result = await updates.check("http://127.0.0.1:9/manifest.json", "0.1.0")
    assert result["error"].startswith("cannot check for updates")
    assert updates.version_key("1.2.0") > updates.version_key("1.2.0rc1")
    assert updates.version_key("v1.10") > updates.version_key("1.9.9")


async def test_check_updates_from_an_http_source(tmp_path: Path) -> None:
    from appliance.web.admin import updates

    root = tmp_path / "site"
    root.mkdir()
    (root / "latest.json").write_text(json.dumps({"version": "99.1.0", "notes": "n"}))
    with serve_directory(root) as url:
        result = await updates.check(f"{url}/latest.json", "0.1.0")
        assert result["update_available"] is True and result["latest_version"] == "99.1.0"
        missing = await updates.check(f"{url}/nope.json", "0.1.0")
        assert "HTTP 404" in missing["error"]
