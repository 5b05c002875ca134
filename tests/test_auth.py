"""Admin authentication: first-start password, login, sessions, CSRF, throttling, password
change — and every admin route refuses a client without a session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from quart import Quart

from appliance.core import auth as auth_mod
from appliance.core.ratelimit import Rate
from appliance.system.config import Settings
from tests.conftest import make_settings as make_settings

if TYPE_CHECKING:
    from quart.typing import TestClientProtocol

OPEN = {"admin.pages.login_page", "admin.api.login"}


def admin_password(settings: Settings) -> str:
    return (settings.data_dir / auth_mod.PASSWORD_FILE).read_text().strip()


async def login_token(client: TestClientProtocol) -> str:
    page = await client.get("/admin/login")
    assert page.status_code == 200
    match = re.search(r'name="csrf-token" content="([^"]+)"', await page.get_data(as_text=True))
    assert match
    return match.group(1)


async def login(client: TestClientProtocol, password: str) -> str:
    """Log in; return the session's CSRF token (read from an admin page, as the JS does)."""
    token = await login_token(client)
    response = await client.post(
        "/admin/api/login", json={"password": password}, headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    page = await client.get("/admin/settings")
    match = re.search(r'name="csrf-token" content="([^"]+)"', await page.get_data(as_text=True))
    assert match
    return match.group(1)


def admin_rules(app: Quart) -> list[tuple[str, str]]:
    """(method, concrete path) of every admin route, with placeholder arguments filled in."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("admin.") or rule.endpoint in OPEN:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", "x" * 32, rule.rule)
        for method in sorted(rule.methods or ()):
            if method not in ("HEAD", "OPTIONS"):
                routes.append((method, path))
    return routes


async def test_first_start_writes_the_password_once(app: Quart, settings: Settings) -> None:
    password_file = settings.data_dir / auth_mod.PASSWORD_FILE
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = admin_password(settings)
    assert len(password) >= 16
    services = app.extensions["appliance"]
    async with services.db.conn.execute("SELECT password_hash FROM auth_admin") as cur:
        row = await cur.fetchone()
    assert row[0].startswith("scrypt$") and password not in row[0]
    # a restart keeps the password (and does not rewrite the file)
    before = password_file.stat().st_mtime_ns
    await services.auth.ensure_admin()
    assert password_file.stat().st_mtime_ns == before


@pytest.mark.sqlite_only
async def test_the_session_secret_file_is_private(app: Quart, settings: Settings) -> None:
    """On PostgreSQL the secret is the cluster's, in the database (test_auth_postgres)."""
    secret_file = settings.data_dir / auth_mod.SECRET_FILE
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert app.extensions["appliance"].auth.secret == secret_file.read_bytes().strip()


async def test_every_admin_route_needs_a_session(app: Quart, client: TestClientProtocol) -> None:
    routes = admin_rules(app)
    assert len(routes) >= 20
    pages = 0
    for method, path in routes:
        response = await client.open(path, method=method)
        if response.status_code == 303:
            pages += 1
            assert method == "GET"
            assert response.headers["Location"].startswith("/admin/login?next=")
        else:
            assert response.status_code == 401, (method, path, response.status_code)
            body = await response.get_json()
            assert body["error"]["code"] == "login_required"
    assert pages == 8  # 7 pages, the status page at /admin and /admin/
    for path in ("/admin", "/admin/", "/admin/check-updates"):
        assert (await client.get(path)).status_code in (303, 401)


async def test_login_logout_and_cookie_flags(
    app: Quart, client: TestClientProtocol, settings: Settings
) -> None:
    token = await login_token(client)
    response = await client.post(
        "/admin/api/login",
        json={"password": admin_password(settings), "next": "//evil.example/"},
        headers={"X-CSRF-Token": token},
        scheme="https",
    )
    assert response.status_code == 200
    assert (await response.get_json())["next"] == "/admin"  # no open redirect
    cookie = next(v for v in response.headers.get_all("Set-Cookie") if v.startswith("wa_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    assert (await client.get("/admin/api/status")).status_code == 200
    page = await client.get("/admin/settings")
    csrf = re.search(r'csrf-token" content="([^"]+)"', await page.get_data(as_text=True))
    assert csrf
    response = await client.post("/admin/api/logout", headers={"X-CSRF-Token": csrf.group(1)})
    assert response.status_code == 200
    assert (await client.get("/admin/api/status")).status_code == 401


async def test_session_cookie_not_secure_over_plain_http_and_tamper_proof(
    client: TestClientProtocol, settings: Settings
) -> None:
    await login(client, admin_password(settings))
    jar = client.cookie_jar
    assert jar is not None
    session = next(c for c in jar if c.name == auth_mod.SESSION_COOKIE)
    assert not session.secure
    value = session.value
    # Change the signature's first character: all six of its bits are signed data, whereas the
    # last base64 character carries padding bits a decoder ignores (replacing the tail with "xx"
    # let a cookie through about once in 256 runs).
    payload, signature = value.rsplit(".", 1)
    forged = payload + "." + ("B" if signature[0] == "A" else "A") + signature[1:]
    client.set_cookie("localhost", auth_mod.SESSION_COOKIE, forged)
    assert (await client.get("/admin/api/status")).status_code == 401
    client.set_cookie("localhost", auth_mod.SESSION_COOKIE, value)
    assert (await client.get("/admin/api/status")).status_code == 200


async def test_login_needs_its_csrf_token(client: TestClientProtocol, settings: Settings) -> None:
    password = admin_password(settings)
    response = await client.post("/admin/api/login", json={"password": password})
    assert response.status_code == 403
    await login_token(client)
    wrong = await client.post(
        "/admin/api/login", json={"password": password}, headers={"X-CSRF-Token": "forged"}
    )
    assert wrong.status_code == 403


async def test_state_changes_without_csrf_token_are_refused(
    app: Quart, client: TestClientProtocol, settings: Settings
) -> None:
    csrf = await login(client, admin_password(settings))
    unsafe = [(m, p) for m, p in admin_rules(app) if m in ("POST", "PUT", "DELETE")]
    assert len(unsafe) >= 9
    for method, path in unsafe:
        for headers in ({}, {"X-CSRF-Token": "0" * 64}):
            response = await client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 403, (method, path)
            assert (await response.get_json())["error"]["code"] == "csrf_failed"
    # the same request with the token goes through
    ok = await client.post("/admin/api/keys", json={"name": "ci"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201


async def test_wrong_passwords_are_throttled(tmp_path: Path) -> None:
    from appliance.web.app import create_app

    settings = make_settings(tmp_path / "data", login_rate_limit=Rate(3, 60.0))
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        token = await login_token(client)
        codes = []
        for _ in range(5):
            response = await client.post(
                "/admin/api/login", json={"password": "guess-123"}, headers={"X-CSRF-Token": token}
            )
            codes.append(response.status_code)
        assert codes == [401, 401, 401, 429, 429]
        assert int(response.headers["Retry-After"]) >= 1
        # even the right password waits until the bucket refills
        right = await client.post(
            "/admin/api/login",
            json={"password": admin_password(settings)},
            headers={"X-CSRF-Token": token},
        )
        assert right.status_code == 429


async def test_change_password(app: Quart, settings: Settings) -> None:
    old = admin_password(settings)
    first, second = app.test_client(), app.test_client()
    csrf = await login(first, old)
    await login(second, old)
    url = "/admin/api/password"
    headers = {"X-CSRF-Token": csrf}
    wrong = await first.post(url, json={"current": "nope", "new": "x" * 12}, headers=headers)
    assert wrong.status_code == 403
    weak = await first.post(url, json={"current": old, "new": "short"}, headers=headers)
    assert weak.status_code == 400
    new = "correct horse battery staple"
    ok = await first.post(url, json={"current": old, "new": new}, headers=headers)
    assert ok.status_code == 200
    assert not (settings.data_dir / auth_mod.PASSWORD_FILE).exists()
    assert (await first.get("/admin/api/status")).status_code == 200  # this session stays
    assert (await second.get("/admin/api/status")).status_code == 401  # others end
    third = app.test_client()
    token = await login_token(third)
    refused = await third.post(
        "/admin/api/login", json={"password": old}, headers={"X-CSRF-Token": token}
    )
    assert refused.status_code == 401
    await login(third, new)


def test_password_hash_round_trip() -> None:
    stored = auth_mod.hash_password("s3cret-passw0rd")
    assert auth_mod.verify_password("s3cret-passw0rd", stored)
    assert not auth_mod.verify_password("s3cret-passw0rD", stored)
    assert not auth_mod.verify_password("x", "garbage")
    assert not auth_mod.verify_password("x", "scrypt$1$2$3$!!$!!")


async def test_reset_admin_password_from_the_command_line(app: Quart, settings: Settings) -> None:
    old = admin_password(settings)
    client = app.test_client()
    await login(client, old)
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "reset-admin-password"],
        env={**os.environ, "DATA_DIR": str(settings.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert str(settings.data_dir / auth_mod.PASSWORD_FILE) in result.stdout
    new = admin_password(settings)
    assert new != old and new not in result.stdout + result.stderr
    assert (await client.get("/admin/api/status")).status_code == 401  # sessions ended
    await login(app.test_client(), new)
