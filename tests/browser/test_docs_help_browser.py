"""The documentation site at /help/ in a real Chromium against a real HTTPS appliance (its CA
trusted as a user would, tests/browser/test_admin_browser.py): the pages render, navigation and
search work, every request stays on the appliance, and no CSP violation reaches the console.

Then the screenshots the docs show (docs/assets/screenshots/*.png, 1280x800) are taken of the
real UI and admin panel. They go to tests/artifacts/screenshots on every run, and into
docs/assets/screenshots when one is missing or with WRITE_SCREENSHOTS=1 (commit them then).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect

from appliance import __version__
from appliance.web.security import CSP
from tests.browser import test_admin_browser as admin_browser
from tests.browser.conftest import watch
from tests.conftest import Server, serve_directory, start_server, stop_server

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
BUILT = ROOT / "build" / "docs"
SCREENSHOTS = ROOT / "docs" / "assets" / "screenshots"
SIZE = {"width": 1280, "height": 800}

# The HTTPS appliance whose CA the browser trusts, and a page that fails the test on any console
# error or failed response (tests/browser/test_admin_browser.py).
https_server = admin_browser.https_server
trusted_home = admin_browser.trusted_home
browser = admin_browser.browser
errors = admin_browser.errors
page = admin_browser.page


def site_is_stale() -> bool:
    """build/docs is missing, or older than a page, an image or mkdocs.yml."""
    index = BUILT / "index.html"
    if not index.is_file():
        return True
    built = index.stat().st_mtime
    sources = [ROOT / "mkdocs.yml", *(p for p in (ROOT / "docs").rglob("*") if p.is_file())]
    return any(p.stat().st_mtime > built for p in sources)


@pytest.fixture(scope="module", autouse=True)
def built_site() -> Path:
    """build/docs as `make docs` builds it, rebuilt when the docs changed since.

    Under a file lock: `make pytest-both` runs two pytest sessions from one checkout, and two
    builds of the same venv and site at once break each other (CI, stop 21)."""
    lock_path = ROOT / ".cache" / "docs-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_site_if_stale()
    return BUILT


def build_site_if_stale() -> None:
    """Build build/docs with the docs venv's mkdocs, or with `make docs` when there is none."""
    if site_is_stale():
        mkdocs = ROOT / ".cache" / "docs-venv" / "bin" / "mkdocs"  # made by `make docs`
        command = (
            [str(mkdocs), "build", "--strict", "--site-dir", str(BUILT)]
            if mkdocs.is_file()
            else ["make", "docs"]
        )
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"


def test_help_pages_navigation_and_search(page: Page, https_server: Server) -> None:
    base = https_server.url
    origin = urlsplit(base).netloc
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda r: (
            elsewhere.append(r.url)
            if urlsplit(r.url).scheme in ("http", "https") and urlsplit(r.url).netloc != origin
            else None
        ),
    )
    page.set_viewport_size(SIZE)
    # 1: from the appliance's own header link to the home page of the help
    page.goto(f"{base}/")
    page.click("header a[href='/help/']")
    expect(page).to_have_url(f"{base}/help/")
    expect(page.locator(".md-header")).to_be_visible()
    expect(page.locator("article h1").first).to_be_visible()
    # Material's bundle ran (it needs the globals csp-base.js defines)
    page.wait_for_function("() => typeof window.__md_get === 'function' && !!window.document$")
    # 2: a tab of the top navigation, then a page of that section from its side navigation
    page.locator("a.md-tabs__link", has_text="Reference").click()
    expect(page).to_have_url(re.compile(r"/help/reference/[a-z-]+\.html$"))
    page.locator("a.md-nav__link:visible", has_text="HTTP API").first.click()
    expect(page).to_have_url(f"{base}/help/reference/api.html")
    expect(page.locator("article")).to_contain_text("/openapi.json")
    # 3: a page opened by its address, then a relative link inside its content
    page.goto(f"{base}/help/install/proxmox.html")
    expect(page.locator("article h1").first).to_be_visible()
    assert page.evaluate("window.isSecureContext") is True
    # search (a web worker over search/search_index.json) finds a known word
    page.locator("input.md-search__input").click()
    page.keyboard.type("Bazarr")
    results = page.locator(".md-search-result__item")
    expect(results.first).to_be_visible(timeout=20_000)
    expect(page.locator(".md-search-result")).to_contain_text("Bazarr")
    results.first.locator("a").first.click()
    expect(page).to_have_url(re.compile(r"/help/.+\.html"))
    # the light/dark toggle (csp-palette.js) keeps working
    scheme = page.evaluate("document.body.dataset.mdColorScheme")
    page.locator("form[data-md-component=palette] label:visible").first.click()
    assert page.evaluate("document.body.dataset.mdColorScheme") != scheme
    assert elsewhere == [], f"requests to other origins: {elsewhere}"
    # the `page` fixture fails the test on any console error: CSP violations included


def test_help_is_served_with_the_app_csp(https_server: Server, page: Page) -> None:
    response = page.goto(f"{https_server.url}/help/")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == CSP  # the app's own, nothing added


# --- screenshots for the docs ----------------------------------------------------------------


@pytest.fixture
def shot_server(tmp_path: Path) -> Iterator[Server]:
    """The appliance as a user sees it on its second start (the first start's password warning
    is gone from the status page), two releases installed and a newer one offered, so the
    Updates page shows what it does."""
    root = tmp_path / "opt"
    for version in (__version__, "0.0.1"):
        (root / "releases" / version).mkdir(parents=True)
    (root / "current").symlink_to(f"releases/{__version__}")
    offered = tmp_path / "updates"
    offered.mkdir()
    (offered / "manifest.json").write_text(
        json.dumps({"version": "9.0.0", "notes": "Example release notes of a newer release."})
    )
    with serve_directory(offered) as source:
        env = {"UPDATER_ROOT": str(root), "UPDATE_SOURCE": f"{source}/manifest.json"}
        stop_server(start_server(tmp_path / "data", env))
        srv = start_server(tmp_path / "data", env)
        yield srv
        stop_server(srv)


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def save(shot: Page, name: str, artifacts: Path) -> None:
    out = artifacts / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    shot.screenshot(path=str(out / name))  # the viewport: always 1280x800
    assert png_size(out / name) == (SIZE["width"], SIZE["height"])
    target = SCREENSHOTS / name
    if os.environ.get("WRITE_SCREENSHOTS") == "1" or not target.is_file():
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / name, target)


def test_screenshots_of_the_ui_and_admin_panel(
    launch_browser: Callable[..., Browser],
    shot_server: Server,
    jfk_wav: Path,
    artifacts: Path,
) -> None:
    context = launch_browser().new_context(viewport=SIZE, device_scale_factor=1)
    shot = context.new_page()
    shot_errors = watch(shot)
    base = shot_server.url
    shot.goto(f"{base}/")
    shot.wait_for_selector("body[data-ready=true]")
    shot.set_input_files("#file-input", str(jfk_wav))
    shot.locator(".file-card .transcript-text").first.wait_for(timeout=90_000)
    save(shot, "ui-main.png", artifacts)
    shot.click("#tab-history")
    shot.locator(".history-item").first.wait_for()
    save(shot, "ui-history.png", artifacts)
    shot.goto(f"{base}/admin")
    shot.fill("#password", (shot_server.data_dir / "admin-password.txt").read_text().strip())
    shot.click("#login-button")
    expect(shot).to_have_url(re.compile(r"/admin/?$"))
    shot.wait_for_load_state("networkidle")
    save(shot, "admin-dashboard.png", artifacts)
    shot.goto(f"{base}/admin/updates")
    expect(shot.locator("#update-info")).to_contain_text("0.0.1")
    shot.wait_for_load_state("networkidle")
    save(shot, "admin-updates.png", artifacts)
    context.close()
    assert shot_errors == []
    for name in ("ui-main.png", "ui-history.png", "admin-dashboard.png", "admin-updates.png"):
        assert png_size(SCREENSHOTS / name) == (SIZE["width"], SIZE["height"]), name
