"""/help/ serves the built documentation site with the app's own headers, and nothing else:
names that leave the site directory get 404, a missing site says how to build it, and the
built pages (build/docs, from `make docs`) carry no inline script and no external asset."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from quart.typing import TestClientProtocol as Client

from appliance.web import help as help_mod
from appliance.web.security import CSP

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "build" / "docs"
SECRET = "secret next to the site"
# what a browser would fetch from another origin: scripts, styles, images, frames, fonts
EXTERNAL_ASSET = re.compile(
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*\ssrc\s*=\s*[\"']?(?:https?:)?//"
    r"|<link\b(?=[^>]*\srel\s*=\s*[\"']?(?:stylesheet|icon|preload|modulepreload|manifest))"
    r"[^>]*\shref\s*=\s*[\"']?(?:https?:)?//"
    r"|url\(\s*[\"']?(?:https?:)?//|@import\s+[\"']?(?:url\()?[\"']?(?:https?:)?//",
    re.IGNORECASE,
)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small built site in a temp dir, with a file beside it that must stay unreachable."""
    root = tmp_path / "docs-site"
    (root / "install").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "index.html").write_text("<!doctype html><title>Help</title><p>home page</p>")
    (root / "install" / "proxmox.html").write_text("<!doctype html><p>pct create</p>")
    (root / "install" / "index.html").write_text("<!doctype html><p>install index</p>")
    (root / "assets" / "app.js").write_text("console.log('help');\n")
    (tmp_path / "secret.txt").write_text(SECRET)
    monkeypatch.setattr(help_mod, "SITE_DIRS", (tmp_path / "missing", root))
    return root


async def test_help_serves_pages_and_assets_with_the_app_headers(
    client: Client, site: Path
) -> None:
    response = await client.get("/help")
    assert response.status_code == 308 and response.headers["Location"].endswith("/help/")
    response = await client.get("/help/")
    assert response.status_code == 200
    assert "home page" in await response.get_data(as_text=True)
    assert response.headers["Content-Security-Policy"] == CSP  # not one bit weaker
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = await client.get("/help/install/proxmox.html")
    assert page.status_code == 200 and "pct create" in await page.get_data(as_text=True)
    assert page.mimetype == "text/html"
    script = await client.get("/help/assets/app.js")
    assert script.status_code == 200 and "javascript" in script.mimetype
    assert script.headers["Content-Security-Policy"] == CSP
    folder = await client.get("/help/install")
    assert folder.status_code == 308 and folder.headers["Location"].endswith("/help/install/")
    index = await client.get("/help/install/")
    assert "install index" in await index.get_data(as_text=True)


@pytest.mark.parametrize(
    "name",
    [
        "../secret.txt",
        "%2e%2e/secret.txt",
        "..%2fsecret.txt",
        "install/../../secret.txt",
        "install/%2e%2e/%2e%2e/secret.txt",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "..\\secret.txt",
        "%00",
        "index.html%00.js",
        "nope.html",
        "install/nope/",
    ],
)
async def test_hostile_names_stay_inside_the_site(client: Client, site: Path, name: str) -> None:
    response = await client.get(f"/help/{name}")
    body = await response.get_data(as_text=True)
    assert SECRET not in body and "root:" not in body
    assert response.status_code in (404, 308), (name, response.status_code)
    if response.status_code == 308:  # the client normalised the name back under /help/
        assert urlsplit(response.headers["Location"]).path.startswith("/help/")
    else:
        assert (await response.get_json())["error"]["code"] == "not_found"


async def test_help_without_a_built_site_says_how_to_build_it(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(help_mod, "SITE_DIRS", (tmp_path / "nothing-here",))
    response = await client.get("/help/")
    assert response.status_code == 404
    error = (await response.get_json())["error"]
    assert error["code"] == "help_not_built" and "make docs" in error["message"]
    curl = await client.get("/help/", headers={"Accept": "*/*"})
    assert curl.status_code == 404 and curl.mimetype == "application/json"
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    page = await client.get("/help/install/proxmox.html", headers={"Accept": browser_accept})
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "make docs" in await page.get_data(as_text=True)
    assert page.headers["Content-Security-Policy"] == CSP


async def test_ui_and_admin_link_to_help(client: Client) -> None:
    main = await client.get("/")
    assert 'href="/help/"' in await main.get_data(as_text=True)
    login = await client.get("/admin/login")
    assert 'href="/help/"' in await login.get_data(as_text=True)


def test_inline_script_detection() -> None:
    """What test_built_pages_carry_no_inline_script looks for."""
    page = (
        '<script src="a.js"></script><script id="__config" type="application/json">{}</script>'
        '<script type="module" src="b.js"></script>'
    )
    assert inline_scripts(page) == []
    assert inline_scripts("<script>var a=1</script>") == ["var a=1"]
    assert inline_scripts('<SCRIPT type="text/javascript">x()</SCRIPT >') == ["x()"]
    assert inline_scripts('<script type="module">y()</script>') == ["y()"]
    assert inline_scripts('<p onclick="z()">') == ['onclick="z()"']
    assert EXTERNAL_ASSET.search('<link rel="stylesheet" href="https://fonts.example/x.css">')
    assert EXTERNAL_ASSET.search("<script src='//cdn.example/x.js'></script>")
    assert not EXTERNAL_ASSET.search('<a href="https://squidfunk.github.io/">theme</a>')


def inline_scripts(html: str) -> list[str]:
    """Scripts a browser would execute from the page itself (CSP blocks them)."""
    found = []
    for match in re.finditer(r"<script\b([^>]*)>(.*?)</script\s*>", html, re.I | re.S):
        attrs, body = match.groups()
        kind = re.search(r"""\stype\s*=\s*["']?([^"'\s>]*)""", attrs, re.I)
        executable = not kind or kind[1].lower() in ("", "module", "text/javascript")
        if executable and not re.search(r"\ssrc\s*=", attrs, re.I):
            found.append(body)
    found += re.findall(r"\son[a-z]+\s*=\s*\"[^\"]*\"", html)  # event handler attributes
    return [f.strip() for f in found]


def built_pages() -> list[Path]:
    if not (BUILT / "index.html").is_file():
        pytest.skip("the docs site is not built: run `make docs`")
    return sorted(BUILT.rglob("*.html"))


def test_built_pages_carry_no_inline_script() -> None:
    """The app's CSP allows no inline script: docs/overrides/ moves Material's into files. A
    theme upgrade that brings one back fails here before it fails in the browser."""
    offenders = {
        str(p.relative_to(BUILT)): found
        for p in built_pages()
        if (found := inline_scripts(p.read_text(errors="replace")))
    }
    assert not offenders, f"inline scripts (blocked by the CSP): {offenders}"


def test_built_site_loads_nothing_from_another_origin() -> None:
    """No web font, CDN or analytics: pages and stylesheets reference this origin only (the
    browser test also watches every request the pages make)."""
    offenders = []
    for path in [*built_pages(), *sorted(BUILT.rglob("*.css"))]:
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(BUILT)}: {m[0]}" for m in EXTERNAL_ASSET.finditer(text)]
    assert not offenders, offenders


def test_the_release_wheel_carries_the_site() -> None:
    """scripts/dist.sh copies build/docs to where the app looks first, and the wheel's package
    data takes that folder: every deploy path that installs the wheel serves /help/."""
    package_dir = ROOT / "appliance"
    relative = help_mod.PACKAGE_SITE.relative_to(package_dir).as_posix()
    dist = (ROOT / "scripts" / "dist.sh").read_text()
    assert f"HELP_SITE=appliance/{relative}\n" in dist
    assert 'cp -a build/docs "$HELP_SITE"' in dist
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["appliance"]
    assert any(p.startswith(f"{relative}/") for p in patterns), patterns
