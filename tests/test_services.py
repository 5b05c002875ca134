"""The typed services: one start-up function in a fixed order, the runtime settings with the
environment as defaults, Quart background tasks, and routes that register explicitly."""

from __future__ import annotations

import asyncio
import importlib
import io
import pkgutil
import socket
from pathlib import Path

import pytest
from quart import Blueprint, Quart
from werkzeug.datastructures import FileStorage

import appliance.web
from appliance.core.auth import Auth
from appliance.core.ratelimit import RateLimiter
from appliance.web.app import build_services, create_app, stop_services
from appliance.web.inbox import Inbox
from appliance.web.services import Limiters, RuntimeSettings, Services
from appliance.web.settings_store import SettingsStore
from appliance.web.webhooks import Dispatcher
from appliance.web.wyoming_server import WyomingServer
from tests.conftest import make_settings


async def test_build_services_types_everything_and_stop_services_closes_it(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path / "data",
        whisper_model="tiny.en",
        max_upload_size=3 * 1024 * 1024,
        require_api_key=True,
        allowed_origins=("https://intranet.example:8443",),
        live_max_sessions=3,
        live_max_minutes=1.5,
        worker_processes=1,
    )
    services = await build_services(settings)
    try:
        assert isinstance(services, Services)
        assert isinstance(services.auth, Auth)
        assert isinstance(services.limiters, Limiters)
        assert isinstance(services.limiters.api, RateLimiter)
        assert isinstance(services.limiters.login, RateLimiter)
        assert isinstance(services.settings_store, SettingsStore)
        assert isinstance(services.webhooks, Dispatcher)
        assert services.jobs.on_finished == services.webhooks.enqueue
        # optional features are off by default: None, not missing
        assert services.wyoming is None and services.inbox is None
        # the environment is the default of every runtime setting, applied once
        assert services.runtime == RuntimeSettings(
            default_model="tiny.en",
            default_language=None,
            max_upload_size=3 * 1024 * 1024,
            require_api_key=True,
            allowed_origins=("https://intranet.example:8443",),
            live_max_sessions=3,
            live_max_minutes=1.5,
            default_callback_url=None,
        )
        assert services.default_model == "tiny.en"
        assert services.max_upload_size == 3 * 1024 * 1024
    finally:
        await stop_services(services)
    assert services.ready is False
    assert services.webhooks.stopped
    with pytest.raises(ValueError):  # the database is closed
        await services.db.conn.execute("SELECT 1")


async def test_runtime_settings_follow_the_admin_store(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", max_upload_size=3 * 1024 * 1024)
    app = create_app(settings)
    async with app.test_app():
        services: Services = app.extensions["appliance"]
        store = services.settings_store
        before = services.runtime
        await store.update(
            {
                "max_upload_size": "2MB",
                "default_language": "de",
                "require_api_key": True,
                "default_callback_url": "https://hooks.example/done",
            }
        )
        assert services.runtime is not before  # a new snapshot, published at once
        assert services.max_upload_size == 2_000_000
        assert services.default_language == "de"
        assert services.runtime.require_api_key is True
        assert services.runtime.default_callback_url == "https://hooks.example/done"
        # back to the environment's values
        await store.update(
            {
                "max_upload_size": 3 * 1024 * 1024,
                "default_language": "",
                "require_api_key": False,
                "default_callback_url": "",
            }
        )
        assert services.runtime == before
        assert store.overridden == set()
        # the API reads the typed value: an upload over the runtime limit is refused
        services.runtime.max_upload_size = 1024 * 1024
        client = app.test_client()
        big = FileStorage(io.BytesIO(b"\0" * (1024 * 1024 + 1)), filename="a.wav")
        response = await client.post("/transcribe", files={"file": big})
        assert response.status_code == 413
        assert (await response.get_json())["error"]["code"]


async def test_warm_up_is_a_quart_background_task(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", worker_processes=1))
    async with app.test_app():
        services: Services = app.extensions["appliance"]
        assert services.warming is not None
        await services.warmed_up()
        assert services.default_model in services.models.loaded
        # a change of the default model warms the new one up the same way
        async with app.app_context():  # as in a request to the admin API
            services.settings_store.warm_up(services.default_model)
        pending = set(app.background_tasks)
        assert pending
        await services.warmed_up()
        assert services.warming.done()
        await asyncio.gather(*pending)
    assert not app.background_tasks  # Quart awaited them at shutdown


async def test_optional_features_start_and_stop_in_order(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        wyoming_enabled=True,
        wyoming_port=0,
        wyoming_zeroconf=False,
        watch_dir=tmp_path / "inbox",
        watch_poll_seconds=0.05,
        worker_processes=1,
    )
    app = create_app(settings)
    async with app.test_app():
        services: Services = app.extensions["appliance"]
        assert isinstance(services.wyoming, WyomingServer) and services.wyoming.port
        assert isinstance(services.inbox, Inbox)
        port = services.wyoming.port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        await services.warmed_up()
    assert services.inbox._task is None or services.inbox._task.done()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def _web_modules() -> list[str]:
    names = [appliance.web.__name__]
    for info in pkgutil.walk_packages(appliance.web.__path__, appliance.web.__name__ + "."):
        names.append(info.name)
    return names


def test_no_module_adds_routes_to_another_modules_blueprint(tmp_path: Path) -> None:
    """Every route's view lives in the module that made its blueprint (registration is
    explicit: importing a module never changes another module's blueprint)."""
    for name in _web_modules():
        importlib.import_module(name)
    app = create_app(make_settings(tmp_path / "data"))
    checked = 0
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        if not view.__module__.startswith("appliance."):  # Quart's /static, /openapi.json
            continue
        blueprint_name, _, _ = rule.endpoint.rpartition(".")
        owner = app.blueprints[blueprint_name].import_name if blueprint_name else app.import_name
        assert view.__module__ == owner, f"{rule.endpoint} ({rule.rule}) is not {owner}'s"
        checked += 1
    assert checked > 40
    # the admin modules' routes are nested under the guarded /admin blueprint
    admin = {r.endpoint for r in app.url_map.iter_rules() if r.rule.startswith("/admin")}
    assert {"admin.pages.login_page", "admin.api.login", "admin.update_api.apply_update"} <= admin
    assert all(e.startswith(("admin.pages.", "admin.api.", "admin.update_api.")) for e in admin)


def test_every_app_gets_its_own_admin_blueprint(tmp_path: Path) -> None:
    first = create_app(make_settings(tmp_path / "a"))
    second = create_app(make_settings(tmp_path / "b"))
    assert isinstance(first.blueprints["admin"], Blueprint)
    assert first.blueprints["admin"] is not second.blueprints["admin"]
    rules = [sorted((r.rule, r.endpoint) for r in a.url_map.iter_rules()) for a in (first, second)]
    assert rules[0] == rules[1]
    assert len(rules[0]) == len(set(rules[0]))  # nothing registered twice


async def test_admin_guard_covers_the_nested_blueprints(app: Quart) -> None:
    client = app.test_client()
    for path in ("/admin/api/status", "/admin/api/updates", "/admin/settings"):
        response = await client.get(path)
        assert response.status_code in (303, 401), path
    assert (await client.get("/admin/login")).status_code == 200
