"""Headless Debian Chromium for browser tests, offline, with an optional fake microphone.

Reusable by any browser test: `launch_browser(...)` takes the fake-microphone clip, whether
the microphone prompt is accepted, and extra host-resolver rules; every browser it starts is
closed at the end of the test. Follows ../shared/OFFLINE.md: Debian's `chromium` through
Playwright (never `playwright install`), `%noloop` fake audio from a 16-bit PCM WAV padded
with silence, and a host resolver that reaches nothing but this machine.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
OFFLINE_RULES = "MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"

LaunchBrowser = Callable[..., Any]


def chromium_args(
    fake_audio: Path | None = None,
    *,
    allow_microphone: bool = True,
    host_rules: str = "",
) -> list[str]:
    """Command-line flags for an offline headless Chromium."""
    rules = f"{host_rules}, {OFFLINE_RULES}" if host_rules else OFFLINE_RULES
    args = [
        f"--host-resolver-rules={rules}",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--use-fake-device-for-media-stream",
    ]
    if allow_microphone:
        args.append("--use-fake-ui-for-media-stream")  # accept the microphone prompt
    else:
        args.append("--deny-permission-prompts")
    if fake_audio is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_audio}%noloop")
    return args


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian chromium is missing: run `make setup` (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def playwright_instance() -> Iterator[Any]:
    """Per test module, so that no Playwright loop outlives the browser tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture
def launch_browser(playwright_instance: Any, chromium_path: str) -> Iterator[LaunchBrowser]:
    """`launch_browser(fake_audio=None, allow_microphone=True, host_rules="", **launch_options)`."""
    browsers: list[Any] = []

    def launch(
        fake_audio: Path | None = None,
        *,
        allow_microphone: bool = True,
        host_rules: str = "",
        **options: Any,
    ) -> Any:
        browser = playwright_instance.chromium.launch(
            executable_path=chromium_path,
            headless=True,
            args=chromium_args(
                fake_audio, allow_microphone=allow_microphone, host_rules=host_rules
            ),
            **options,
        )
        browsers.append(browser)
        return browser

    yield launch
    for browser in browsers:
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots for humans (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def fake_microphone_wav(source: Path, target: Path, lead: float = 0.5, tail: float = 1.0) -> Path:
    """A clip as Chromium's fake microphone wants it: 16-bit PCM WAV, padded with silence."""
    subprocess.run(
        [
            "sox",
            str(source),
            "-b",
            "16",
            "-e",
            "signed-integer",
            str(target),
            "pad",
            str(lead),
            str(tail),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="session")
def speech_wav(jfk_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JFK (11 s), 0.5 s of silence before and 1 s after, for the fake microphone."""
    return fake_microphone_wav(jfk_wav, tmp_path_factory.mktemp("mic") / "jfk-mic.wav")


class PageErrors(list[str]):
    """Script errors and console errors (CSP violations included) of a page."""


def watch(page: Any) -> PageErrors:
    errors = PageErrors()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    return errors
