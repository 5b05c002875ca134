"""The admin panel at `/admin`: server-rendered pages (plain ES modules, no inline script) and
the JSON API under `/admin/api/*` they call. Everything but the login page needs an admin
session; every state-changing request needs the session's CSRF token."""

from __future__ import annotations

from quart import Quart

from appliance.system.update import spool as update_spool
from appliance.web.admin import api, pages, update_api
from appliance.web.admin.guard import blueprint


def init_app(app: Quart) -> None:
    # the modules add their routes to the one guarded blueprint
    assert api and pages and update_api
    app.register_blueprint(blueprint)

    @app.before_serving
    async def _prepare_update_spool() -> None:
        # the updater (root) reads requests from here; uploads a crash left behind go
        update_spool.prepare(app.extensions["settings"].data_dir)
