"""Security headers, CORS, the API-key requirement, and secrets kept out of the DB and logs."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.system import logging_setup
from appliance.system.config import Settings
from tests.test_auth import admin_password, login

if TYPE_CHECKING:
    from quart.typing import TestClientProtocol


def _every_file_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


async def test_security_headers_on_every_response(client: TestClientProtocol) -> None:
    for path in ("/", "/health", "/admin/login", "/api/models", "/docs", "/no-such-page"):
        response = await client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert (
            "script-src 'self'" in csp
            and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        )
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "Strict-Transport-Security" not in response.headers  # plain HTTP: no HSTS
        assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-ID"])
    secure = await client.get("/health", scheme="https")
    assert secure.headers["Strict-Transport-Security"] == "max-age=31536000"


async def test_pages_have_no_inline_script(client: TestClientProtocol, settings: Settings) -> None:
    await login(client, admin_password(settings))
    pages = ["/admin/login", "/trust"] + [
        f"/admin{p}"
        for p in ("", "/models", "/settings", "/keys", "/logs", "/updates", "/password")
    ]
    for path in pages:
        html = await (await client.get(path)).get_data(as_text=True)
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert all("src=" in tag for tag in scripts), path
        assert not re.search(r"\son[a-z]+\s*=", html), path  # no inline event handlers
        assert "http://" not in html.replace("http://localhost", "") or path == "/trust"


async def test_cors_is_off_by_default_and_follows_the_allow_list(
    client: TestClientProtocol, settings: Settings
) -> None:
    evil = {"Origin": "https://evil.example"}
    response = await client.get("/api/models", headers=evil)
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = await client.options(
        "/transcribe", headers={**evil, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 403
    csrf = await login(client, admin_password(settings))
    put = await client.put(
        "/admin/api/settings",
        json={"allowed_origins": ["https://intranet.example:8443"]},
        headers={"X-CSRF-Token": csrf},
    )
    assert put.status_code == 200
    good = {"Origin": "https://intranet.example:8443"}
    response = await client.get("/api/models", headers=good)
    assert response.headers["Access-Control-Allow-Origin"] == "https://intranet.example:8443"
    assert "Access-Control-Allow-Credentials" not in response.headers
    preflight = await client.options(
        "/transcribe", headers={**good, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 204
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    # the admin API is never cross-origin
    admin = await client.get("/admin/api/settings", headers=good)
    assert "Access-Control-Allow-Origin" not in admin.headers


async def _require_keys(client: TestClientProtocol, csrf: str, on: bool) -> None:
    response = await client.put(
        "/admin/api/settings", json={"require_api_key": on}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200


async def test_api_key_required_mode(app: Quart, settings: Settings, jfk_wav: Path) -> None:
    admin = app.test_client()
    csrf = await login(admin, admin_password(settings))
    created = await admin.post(
        "/admin/api/keys", json={"name": "ci robot"}, headers={"X-CSRF-Token": csrf}
    )
    assert created.status_code == 201
    body = await created.get_json()
    key, key_id = body["key"], body["id"]
    assert key.startswith("wa_") and body["prefix"] in key

    anonymous = app.test_client()
    # off by default: the LAN appliance answers without a key
    assert (await anonymous.get("/api/models")).status_code == 200
    await _require_keys(admin, csrf, True)

    def bearer(value: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {value}"}

    for path in ("/api/models", "/api/status", "/v1/models", "/api/history"):
        missing = await anonymous.get(path)
        assert missing.status_code == 401, path
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await anonymous.get(path, headers=bearer("wa_nope_nope"))).status_code == 401
        assert (await anonymous.get(path, headers=bearer(key))).status_code == 200, path
        assert (await admin.get(path)).status_code == 200, path  # the admin session passes
    assert (await anonymous.post("/transcribe")).status_code == 401
    assert (await anonymous.get("/health")).status_code == 200  # probes stay open
    audio = {"file": (jfk_wav.read_bytes(), "jfk.wav")}
    ok = await anonymous.post("/transcribe", headers=bearer(key), files=_files(audio))
    assert ok.status_code == 200, await ok.get_data(as_text=True)
    assert "ask not" in (await ok.get_json())["text"]

    async with anonymous.websocket("/ws/live") as ws:
        try:
            await ws.send("{}")
            await ws.receive()
            raise AssertionError("the live socket accepted a client without a key")
        except Exception as exc:  # quart's WebsocketResponseError carries the 401
            assert getattr(getattr(exc, "response", None), "status_code", None) == 401

    listed = await (await admin.get("/admin/api/keys")).get_json()
    assert listed["keys"][0]["last_used"] is not None
    revoked = await admin.delete(f"/admin/api/keys/{key_id}", headers={"X-CSRF-Token": csrf})
    assert revoked.status_code == 200
    assert (await anonymous.get("/api/models", headers=bearer(key))).status_code == 401
    await _require_keys(admin, csrf, False)
    assert (await anonymous.get("/api/models")).status_code == 200


def _files(spec: dict[str, tuple[bytes, str]]) -> dict[str, object]:
    return {
        name: FileStorage(io.BytesIO(data), filename=fname, content_type="audio/wav")
        for name, (data, fname) in spec.items()
    }


async def test_secrets_never_in_clear_in_db_or_logs(app: Quart, settings: Settings) -> None:
    client = app.test_client()
    password = admin_password(settings)
    csrf = await login(client, password)
    key = (
        await (
            await client.post(
                "/admin/api/keys", json={"name": "secret test"}, headers={"X-CSRF-Token": csrf}
            )
        ).get_json()
    )["key"]
    other = app.test_client()
    await other.get("/api/models", headers={"Authorization": f"Bearer {key}"})
    await other.get("/api/models", headers={"Authorization": "Bearer wa_deadbeef_notarealkey"})
    new = "a brand new passphrase"
    await client.post(
        "/admin/api/password",
        json={"current": password, "new": new},
        headers={"X-CSRF-Token": csrf},
    )
    services = app.extensions["appliance"]
    await services.db.conn.commit()
    stored = _every_file_bytes(settings.data_dir)
    for secret in (password, key, new, key.split("_", 2)[2]):
        assert secret.encode() not in stored, "a secret is stored in clear"
    log_text = logging_setup.log_path(settings).read_text()
    assert "admin-password.txt" in log_text  # the first start says where to look
    for secret in (password, key, new):
        assert secret not in log_text


def test_scrub_redacts_secrets() -> None:
    line = 'Authorization: Bearer wa_0123abcd_AAAAAAAAAAAAAAAAAAAAAAAA password="hunter22"'
    clean = logging_setup.scrub(line)
    assert "AAAAAAAA" not in clean and "hunter22" not in clean
