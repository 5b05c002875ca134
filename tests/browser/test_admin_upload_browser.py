"""The admin pages' file uploads (common.js `upload`: XMLHttpRequest with a progress bar) in a
real Chromium against a real server: a model archive is imported (and listed), a broken one is
refused with the server's message, and a file that is no release is refused on the Updates
page — no console errors (CSP) beyond the refused requests themselves."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import watch
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.browser


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data")
    yield srv
    stop_server(srv)


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_model_import_and_release_upload(
    launch_browser: Callable[..., Browser], server: Server, tmp_path: Path
) -> None:
    page: Page = launch_browser().new_page()
    errors = watch(page)
    base = server.url
    page.goto(f"{base}/admin/models")
    page.fill("#password", (server.data_dir / "admin-password.txt").read_text().strip())
    page.click("#login-button")
    expect(page).to_have_url(f"{base}/admin/models")

    good = _archive(
        tmp_path / "good.tar.gz",
        {
            "model.bin": b"\0" * 1024,
            "config.json": json.dumps({"num_mel_bins": 80}).encode(),
            "tokenizer.json": b"{}",
        },
    )
    page.fill("#import-name", "uploaded-model")
    page.set_input_files("#import-file", str(good))
    page.click('#import-form button[type="submit"]')
    expect(page.locator("#message")).to_have_text("Imported uploaded-model.")
    expect(page.locator("#import-progress")).to_be_hidden()
    expect(page.locator('tr[data-model="uploaded-model"]')).to_be_visible()
    assert (server.data_dir / "models" / "uploaded-model" / "model.bin").is_file()

    bad = _archive(tmp_path / "bad.tar.gz", {"config.json": b"{}"})
    page.fill("#import-name", "broken-model")
    page.set_input_files("#import-file", str(bad))
    page.click('#import-form button[type="submit"]')
    expect(page.locator("#message")).to_contain_text(
        "no model.bin with model.bin, config.json, tokenizer.json"
    )
    expect(page.locator("#message")).to_have_class("error")
    assert not (server.data_dir / "models" / "broken-model").exists()

    page.goto(f"{base}/admin/updates")
    junk = tmp_path / "junk.release.tar"
    junk.write_bytes(b"this is no release bundle")
    page.on("dialog", lambda dialog: dialog.accept())
    page.set_input_files('#upload-form input[name="file"]', str(junk))
    page.click('#upload-form button[type="submit"]')
    expect(page.locator("#message")).to_have_class("error")
    expect(page.locator("#upload-progress")).to_be_hidden()
    # only the two refused uploads, reported by Chromium as failed loads: no script error
    assert len(errors) == 2, errors
    assert all(e.startswith("console: Failed to load resource") for e in errors), errors
