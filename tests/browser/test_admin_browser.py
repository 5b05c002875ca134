"""A real Chromium against a real HTTPS appliance, with the appliance's CA trusted the way a
user would trust it (an NSS database, as on a Linux desktop) — certificate errors are NOT
ignored. Checks the secure context, then logs in, switches the default model, and creates
and revokes an API key in the admin panel."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.browser


def lan_address() -> str | None:
    """A non-loopback IPv4 address of this host (a secure context only with a valid cert)."""
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if (
                entry.family == socket.AF_INET
                and not ipaddress.ip_address(entry.address).is_loopback
            ):
                return str(entry.address)
    return None


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("browser-https") / "data",
        {"HTTPS_ENABLED": "true", "BIND_ADDRESS": "0.0.0.0"},  # noqa: S104 - reached by its LAN IP
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def trusted_home(tmp_path_factory: pytest.TempPathFactory, https_server: Server) -> Path:
    """A throwaway $HOME whose NSS database (what Chromium on Linux reads) trusts the CA."""
    certutil = shutil.which("certutil")  # Debian package libnss3-tools
    if certutil is None:
        pytest.fail("certutil missing: run `make setup` (Debian package libnss3-tools)")
    home = tmp_path_factory.mktemp("home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([certutil, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    subprocess.run(
        [
            certutil,
            "-A",
            "-d",
            f"sql:{nssdb}",
            "-n",
            "whisper-appliance-ca",
            "-t",
            "C,,",
            "-i",
            str(https_server.data_dir / "tls" / "ca.crt"),
        ],
        check=True,
    )
    return home


@pytest.fixture
def browser(launch_browser: Callable[..., Browser], trusted_home: Path) -> Browser:
    """Chromium (tests/browser/conftest.py) with the trusting $HOME, offline but for the
    appliance's own addresses."""
    lan = lan_address()
    return launch_browser(
        host_rules=f"EXCLUDE {lan}" if lan else "",
        env={**os.environ, "HOME": str(trusted_home)},
    )


@pytest.fixture
def errors() -> list[str]:
    """Console errors and failed responses of the page; the test clears the expected ones."""
    return []


@pytest.fixture
def page(browser: Browser, errors: list[str]) -> Iterator[Page]:
    context = browser.new_context()
    new_page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    new_page.on("console", on_console)
    new_page.on("pageerror", lambda exc: errors.append(str(exc)))
    new_page.on(
        "response",
        lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
    )
    yield new_page
    context.close()
    assert errors == [], f"browser console errors (CSP?): {errors}"


def test_https_with_the_trusted_ca_is_a_secure_context(page: Page, https_server: Server) -> None:
    port = https_server.url.rsplit(":", 1)[1]
    hosts = ["127.0.0.1", "localhost"]
    lan = lan_address()
    if lan:
        hosts.append(lan)  # a LAN address: secure only because the certificate is valid
    for host in hosts:
        response = page.goto(f"https://{host}:{port}/trust")
        assert response is not None and response.status == 200, host
        assert page.evaluate("window.isSecureContext") is True, host
        assert page.evaluate("location.protocol") == "https:"
        expect(page.locator("#fingerprint")).to_contain_text(":")


def test_admin_login_switch_model_and_api_keys(
    page: Page, errors: list[str], https_server: Server, artifacts: Path
) -> None:
    base = https_server.url
    password = (https_server.data_dir / "admin-password.txt").read_text().strip()
    page.goto(f"{base}/admin/models")
    expect(page).to_have_url(f"{base}/admin/login?next=/admin/models")
    page.fill("#password", "not the password")
    page.click("#login-button")
    expect(page.locator("#message")).to_have_text("wrong password")
    assert len(errors) == 2 and "401" in errors[0]  # the refused login, and only that
    errors.clear()
    page.fill("#password", password)
    page.click("#login-button")
    expect(page).to_have_url(f"{base}/admin/models")

    # switch the default model to the bundled multilingual base
    page.click('button[data-default="base"]')
    expect(page.locator("#message")).to_have_text("base is now the default model.")
    expect(page.locator('tr[data-model="base"]')).to_contain_text("(default)")
    page.screenshot(path=artifacts / "admin-models.png", full_page=True)
    status = page.evaluate("fetch('/api/status').then((r) => r.json())")
    assert status["default_model"] == "base"
    page.goto(f"{base}/admin/settings")
    expect(page.locator("#default_model")).to_have_value("base")

    # the status page refreshes by itself
    page.goto(f"{base}/admin")
    expect(page.locator("#service")).to_contain_text("base")
    page.screenshot(path=artifacts / "admin-status.png", full_page=True)

    # create an API key (shown once), use it, revoke it
    page.goto(f"{base}/admin/keys")
    page.fill("#key-name", "browser test")
    page.click("#create-key")
    expect(page.locator("#new-key")).to_be_visible()
    key = page.locator("#new-key-value").inner_text()
    assert key.startswith("wa_")
    row = page.locator("#keys tr", has_text="browser test")
    expect(row).to_contain_text("active")
    used = page.evaluate(
        "(key) => fetch('/api/models', {headers: {Authorization: `Bearer ${key}`}})"
        ".then((r) => r.status)",
        key,
    )
    assert used == 200
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button[data-revoke]").click()
    expect(row).to_contain_text("revoked")
    expect(page.locator("#new-key")).to_be_hidden()  # the clear key leaves the screen
    expect(page.locator("#message")).to_contain_text("Revoked")
    page.screenshot(path=artifacts / "admin-keys.png", full_page=True)

    # log out: the admin pages need a login again
    page.click("#logout")
    expect(page).to_have_url(f"{base}/admin/login")
    page.goto(f"{base}/admin/keys")
    expect(page).to_have_url(f"{base}/admin/login?next=/admin/keys")
