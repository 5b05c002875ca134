"""The admin Updates page in a real Chromium against a real server: it lists the installed
releases, asks for a rollback (with a confirmation), shows the request as pending, and after
the real updater (`run_request`, here without root: the install root is a temp dir) did the
rollback it shows the outcome and the history row — no console errors (CSP) on the way."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from appliance import __version__
from appliance.system.update import cli as update_cli
from appliance.system.update import spool as update_spool
from appliance.system.update import updater
from appliance.system.update.updater import Config, Updater
from tests.browser.conftest import watch
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.browser

OLD = "0.0.1"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two releases; `current` is the old one, so a rollback goes to the running version
    (whose /health and test transcription the real server answers)."""
    root = tmp_path / "opt"
    for version in (__version__, OLD):
        (root / "releases" / version).mkdir(parents=True)
    (root / "current").symlink_to(f"releases/{OLD}")
    return root


@pytest.fixture
def server(tmp_path: Path, root: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data", {"UPDATER_ROOT": str(root)})
    yield srv
    stop_server(srv)


def test_rollback_from_the_updates_page(
    launch_browser: Callable[..., Browser], server: Server, root: Path, artifacts: Path
) -> None:
    page: Page = launch_browser().new_page()
    errors = watch(page)
    base = server.url
    page.goto(f"{base}/admin/updates")
    page.fill("#password", (server.data_dir / "admin-password.txt").read_text().strip())
    page.click("#login-button")
    expect(page).to_have_url(f"{base}/admin/updates")
    expect(page.locator("#update-info")).to_contain_text(OLD)
    expect(page.locator("#update-progress")).to_have_text("No update requested.")

    dialogs: list[str] = []

    def accept(dialog: object) -> None:
        dialogs.append(dialog.message)  # type: ignore[attr-defined]
        dialog.accept()  # type: ignore[attr-defined]

    page.once("dialog", accept)
    page.click("#rollback-form button[type=submit]")
    expect(page.locator("#update-progress")).to_have_attribute("data-state", "pending")
    assert "Roll back to the previous release?" in dialogs[0]
    expect(page.locator("#rollback-form button[type=submit]")).to_be_disabled()
    spool = server.data_dir / update_spool.SPOOL
    assert update_spool.read_pending(spool)["action"] == "rollback"  # type: ignore[index]

    # what whisper-appliance-update.service does when the path unit sees the request
    cfg = Config(
        root=root,
        data_dir=server.data_dir,
        stop_command="",
        restart_command="",
        url=base,
        health_timeout=30,
    )
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(update_cli.run_request(Updater(cfg))))
    worker.start()
    worker.join(120)
    assert codes == [updater.EXIT_OK], update_spool.read_status(spool)

    progress = page.locator("#update-progress")
    expect(progress).to_have_attribute("data-state", "succeeded", timeout=15_000)
    expect(progress).to_contain_text(f"{OLD} → {__version__}")
    row = page.locator("#update-history tr").first
    expect(row).to_have_attribute("data-status", "succeeded")
    expect(row).to_contain_text("rollback")
    expect(page.locator("#message")).to_contain_text("Rollback succeeded")
    expect(page.locator("#rollback-form button[type=submit]")).to_be_enabled()
    assert (root / "current").resolve().name == __version__
    page.screenshot(path=artifacts / "admin-updates.png", full_page=True)
    assert list(errors) == []
