"""The admin panel at `/admin`: server-rendered pages (plain ES modules, no inline script) and
the JSON API under `/admin/api/*` they call. Everything but the login page needs an admin
session; every state-changing request needs the session's CSRF token."""

from __future__ import annotations

from quart import Quart

from appliance.system.config import Settings
from appliance.system.update import spool as update_spool
from appliance.web.admin import api, pages, update_api
from appliance.web.admin.guard import make_blueprint


def init_app(app: Quart) -> None:
    # each module's routes are on its own blueprint, nested here under the guard (endpoints
    # `admin.pages.*`, `admin.api.*`, `admin.update_api.*`)
    admin = make_blueprint()
    for module in (pages, api, update_api):
        admin.register_blueprint(module.blueprint)
    app.register_blueprint(admin)
    settings: Settings = app.extensions["settings"]

    @app.before_serving
    async def _prepare_update_spool() -> None:
        # the updater (root) reads requests from here; uploads a crash left behind go
        update_spool.prepare(settings.data_dir)
