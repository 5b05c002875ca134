"""`/help/`: the documentation site (MkDocs + Material, built by `make docs`) served by the app.

Where the built site is looked for, first found wins:
- `appliance/web/help_site/` inside the installed package: the release wheel carries it
  (scripts/dist.sh copies `build/docs` there for the wheel build), so every deploy path that
  installs the wheel (Ansible role, CT template, install.sh, container images) serves it;
- `build/docs/` of a source checkout (`make docs` writes it), for `make run` and the tests.

The pages get exactly the app's security headers and CSP (no inline script, nothing from
another origin): the site's theme overrides (docs/overrides/) move Material's inline scripts
into files, and tests/test_docs_help.py fails when a built page still carries one. Names are
resolved inside the site directory only (werkzeug's safe_join). Without a built site /help
answers 404 saying how to build it.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

from quart import Blueprint, Quart, Response, redirect, request, send_from_directory
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import NotFound
from werkzeug.security import safe_join

from appliance.web.errors import error_response

PACKAGE_SITE = Path(__file__).resolve().parent / "help_site"
CHECKOUT_SITE = Path(__file__).resolve().parents[2] / "build" / "docs"
SITE_DIRS = (PACKAGE_SITE, CHECKOUT_SITE)
NOT_BUILT = (
    "The help pages are not built on this appliance. In a source checkout run `make docs` "
    "(it writes build/docs); release wheels and images carry them."
)

blueprint = Blueprint("help", __name__)


def site_dir() -> Path | None:
    """The built site's directory, or None when no site was built."""
    for directory in SITE_DIRS:
        if (directory / "index.html").is_file():
            return directory
    return None


def _is_folder(path: str) -> bool:
    return Path(path).is_dir()


def _not_built() -> Response:
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        page = (
            '<!doctype html><html lang="en"><meta charset="utf-8"><title>Help not built</title>'
            f"<h1>Help not built</h1><p>{escape(NOT_BUILT)}</p>"
            '<p><a href="/">Back to the appliance</a></p></html>'
        )
        return Response(page, status=404, content_type="text/html; charset=utf-8")
    return error_response(404, "help_not_built", NOT_BUILT)


def _no_page() -> Response:
    return error_response(404, "not_found", "no such help page (the index is at /help/)")


@blueprint.get("/help")
async def help_root() -> ResponseReturnValue:
    """The documentation site: redirects to /help/."""
    return redirect("/help/", 308)


@blueprint.get("/help/")
@blueprint.get("/help/<path:name>")
async def help_page(name: str = "") -> ResponseReturnValue:
    """A page or asset of the documentation site (built by `make docs`)."""
    directory = site_dir()
    if directory is None:
        return _not_built()
    target = safe_join(str(directory), name) if name else str(directory)
    if target is None or "\x00" in name:
        return _no_page()
    if _is_folder(target):
        if name and not name.endswith("/"):  # the page's relative links need the slash
            return redirect(f"/help/{quote(name)}/", 308)
        name = f"{name}index.html"
    try:
        return await send_from_directory(directory, name)
    except NotFound:
        return _no_page()


def init_app(app: Quart) -> None:
    app.register_blueprint(blueprint)
