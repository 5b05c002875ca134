"""Every admin form with bad input — empty, wrong type, oversized, hostile names — answers a
4xx JSON error, never a 500."""

from __future__ import annotations

import io
import tarfile
import zipfile
from typing import Any

import pytest
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.system.config import Settings
from tests.test_admin import Admin
from tests.test_auth import admin_password, login, login_token


@pytest.fixture
async def admin(app: Quart, settings: Settings) -> Admin:
    client = app.test_client()
    return Admin(client, await login(client, admin_password(settings)))


HOSTILE_NAMES = [
    "..",
    ".hidden",
    "a..b",
    "x" * 200,
    "<script>alert(1)<",
    "名前",
    "a b",
    "%2e%2e",
    "null\x00byte",
    "con;rm -rf",
]


async def _expect_4xx(admin: Admin, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    code, body = await admin.call(method, path, **kwargs)
    assert 400 <= code < 500, (method, path, kwargs, code, body)
    assert isinstance(body, dict) and body["error"]["code"] and body["error"]["message"], body
    return body


async def test_login_form(app: Quart) -> None:
    client = app.test_client()
    token = await login_token(client)
    headers = {"X-CSRF-Token": token}
    cases: list[dict[str, Any]] = [
        {"data": b""},
        {"data": b"password=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"json": []},
        {"json": "password"},
        {"json": {}},
        {"json": {"password": ""}},
        {"json": {"password": 12345}},
        {"json": {"password": None}},
        {"json": {"password": ["a"]}},
        {"json": {"password": "x" * 5000}},
        {"json": {"password": "y" * 100_000}},
        {"data": b"\xff\xfe" * 10, "headers": {"Content-Type": "application/json"}},
    ]
    for case in cases:
        kwargs = dict(case)
        response = await client.post(
            "/admin/api/login", headers={**headers, **kwargs.pop("headers", {})}, **kwargs
        )
        assert 400 <= response.status_code < 500, (case, response.status_code)
        body = await response.get_json()
        assert body["error"]["code"], case


async def test_password_form(admin: Admin) -> None:
    url = "/admin/api/password"
    for body in (
        {},
        {"current": None, "new": None},
        {"current": 1, "new": 2},
        {"current": "wrong", "new": "long enough password"},
        {"current": "x" * 2000, "new": "y" * 2000},
        [],
    ):
        await _expect_4xx(admin, "POST", url, json=body)
    await _expect_4xx(
        admin, "POST", url, data=b"x" * 70_000, headers={"Content-Type": "application/json"}
    )


async def test_settings_form(admin: Admin) -> None:
    url = "/admin/api/settings"
    bad: list[Any] = [
        [],
        "string",
        {"no_such_setting": 1},
        {"<script>": 1},
        {"default_model": ""},
        {"default_model": 3},
        {"default_model": "../../etc/passwd"},
        {"default_model": "no-such-model"},
        {"default_model": "small"},  # in the catalogue, not downloaded
        {"default_language": 7},
        {"default_language": "english please"},
        {"default_language": "<b>"},
        {"max_upload_size": -1},
        {"max_upload_size": 0},
        {"max_upload_size": "lots"},
        {"max_upload_size": 10**15},
        {"max_upload_size": True},
        {"max_upload_size": 1.5},
        {"history_retention_days": -1},
        {"history_retention_days": "ten"},
        {"history_retention_days": None},
        {"history_retention_days": 10**9},
        {"history_max_rows": [1]},
        {"live_max_sessions": 999},
        {"live_max_minutes": {"a": 1}},
        {"require_api_key": "maybe"},
        {"require_api_key": 2},
        {"allowed_origins": "javascript:alert(1)"},
        {"allowed_origins": ["https://ok.example", 5]},
        {"allowed_origins": ["*"]},
        {"allowed_origins": ["https://a.example/path"]},
        {"allowed_origins": [f"https://h{i}.example" for i in range(40)]},
        {"allowed_origins": 12},
    ]
    for body in bad:
        await _expect_4xx(admin, "PUT", url, json=body)
    await _expect_4xx(admin, "PUT", url, data=b"{", headers={"Content-Type": "application/json"})
    await _expect_4xx(admin, "PUT", url, data=b"a=1", headers={"Content-Type": "text/plain"})
    huge = b'{"default_language": "' + b"a" * 70_000 + b'"}'
    await _expect_4xx(admin, "PUT", url, data=huge, headers={"Content-Type": "application/json"})
    # nothing of that was stored
    _, described = await admin.call("GET", url)
    assert described["overridden"] == []


async def test_api_key_forms(admin: Admin) -> None:
    for body in (
        {},
        {"name": ""},
        {"name": "   "},
        {"name": 5},
        {"name": None},
        {"name": ["x"]},
        {"name": "x" * 81},
        {"name": "<script>alert(1)</script>"},
        {"name": "line\nbreak"},
        [],
    ):
        await _expect_4xx(admin, "POST", "/admin/api/keys", json=body)
    for key_id in ("x", "0" * 31, "../../etc", "Z" * 32, "a" * 500, "%00", "名前"):
        await _expect_4xx(admin, "DELETE", f"/admin/api/keys/{key_id}")
    await _expect_4xx(admin, "DELETE", "/admin/api/keys/" + "0" * 32)  # well-formed, unknown
    _, listing = await admin.call("GET", "/admin/api/keys")
    assert listing["keys"] == []


async def test_model_routes_with_hostile_names(admin: Admin) -> None:
    for name in HOSTILE_NAMES:
        for method, suffix in (("POST", "/download"), ("POST", "/load"), ("DELETE", "")):
            code, body = await admin.call(method, f"/admin/api/models/{name}{suffix}")
            assert 400 <= code < 500, (name, method, code)
    body = await _expect_4xx(admin, "POST", "/admin/api/models/no-such-model/download")
    assert body["error"]["code"] == "model_not_found"
    await _expect_4xx(admin, "POST", "/admin/api/models/small/load")  # not downloaded
    await _expect_4xx(admin, "DELETE", "/admin/api/models/small")  # nothing to delete


def _tar(members: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("model/model.bin")
            info.type = tarfile.SYMTYPE
            info.linkname = link
            tar.addfile(info)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


async def test_model_import_form(admin: Admin) -> None:
    url = "/admin/api/models/import"
    good = {"model.bin": b"0", "config.json": b"{}", "tokenizer.json": b"{}"}

    def files(data: bytes, filename: str = "m.tar.gz") -> dict[str, FileStorage]:
        return {"file": FileStorage(io.BytesIO(data), filename=filename)}

    await _expect_4xx(admin, "POST", url, json={"name": "x"})  # not multipart
    await _expect_4xx(admin, "POST", url, form={"name": "x"})  # no file
    await _expect_4xx(admin, "POST", url, files=files(_tar(good)))  # no name
    for name in HOSTILE_NAMES:
        await _expect_4xx(admin, "POST", url, form={"name": name}, files=files(_tar(good)))
    await _expect_4xx(admin, "POST", url, form={"name": "m"}, files=files(b""))
    await _expect_4xx(admin, "POST", url, form={"name": "m"}, files=files(b"not an archive"))
    await _expect_4xx(
        admin, "POST", url, form={"name": "m"}, files=files(_tar({"../../evil": b"x", **good}))
    )
    await _expect_4xx(
        admin, "POST", url, form={"name": "m"}, files=files(_tar({}, link="/etc/passwd"))
    )
    await _expect_4xx(
        admin, "POST", url, form={"name": "m"}, files=files(_tar({"model/model.bin": b"0"}))
    )
    bad_config = {**good, "config.json": b"{oops"}
    await _expect_4xx(admin, "POST", url, form={"name": "m"}, files=files(_tar(bad_config)))
    await _expect_4xx(
        admin, "POST", url, form={"name": "m"}, files=files(_zip({"/abs/model.bin": b"0"}), "m.zip")
    )
    _, body = await admin.call("GET", "/admin/api/models")
    assert all(m["name"] != "m" for m in body["models"])


async def test_logs_query(admin: Admin) -> None:
    for query in (
        "level=LOUD",
        "level=",
        "level=%3Cscript%3E",
        "lines=0",
        "lines=-5",
        "lines=abc",
        "lines=999999",
        "lines=1e3",
    ):
        await _expect_4xx(admin, "GET", f"/admin/api/logs?{query}")
