"""The admin panel at `/admin`: server-rendered pages (plain ES modules, no inline script) and
the JSON API under `/admin/api/*` they call. Everything but the login page needs an admin
session; every state-changing request needs the session's CSRF token."""

from __future__ import annotations

from quart import Quart

from appliance.admin import api, pages
from appliance.admin.guard import blueprint


def init_app(app: Quart) -> None:
    # the modules add their routes to the one guarded blueprint
    assert api and pages
    app.register_blueprint(blueprint)
