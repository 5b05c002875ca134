"""Speakers in the browser: a two-speaker recording uploaded with "Who said what" on comes back
with each segment labelled, one colour per speaker (classes, no inline styles: the CSP), the
same colours in the History panel, where a renamed speaker shows its new name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import LaunchBrowser, watch
from tests.conftest import ROOT, Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CLIP = ROOT / ".cache" / "clips" / "diarization" / "sample.wav"


def colours(scope: Any) -> dict[str, set[str]]:
    """Speaker label -> the computed colours of its labels inside `scope`."""
    pairs = scope.locator(".speaker-label").evaluate_all(
        "(nodes) => nodes.map((n) => [n.dataset.speaker, getComputedStyle(n).color,"
        " n.getAttribute('style')])"
    )
    assert all(style is None for _, _, style in pairs), "speaker colours must come from classes"
    out: dict[str, set[str]] = {}
    for speaker, colour, _ in pairs:
        out.setdefault(speaker, set()).add(colour)
    return out


def test_two_speakers_are_coloured_in_files_and_history(
    launch_browser: LaunchBrowser, server: Server, artifacts: Path
) -> None:
    if not CLIP.is_file():
        pytest.fail(f"{CLIP} missing: run `make setup` (scripts/fetch_clips.py)")
    page = launch_browser().new_page(viewport={"width": 1100, "height": 900})
    errors = watch(page)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    text_colour = page.evaluate("() => getComputedStyle(document.body).color")

    page.check("#file-diarize")
    page.fill("#file-speakers", "2")
    page.set_input_files("#file-input", str(CLIP))
    card = page.locator(".file-card").first
    card.locator(".transcript-text").wait_for(timeout=180_000)
    assert card.get_attribute("data-state") == "done"
    files = colours(card)
    assert set(files) == {"Speaker 1", "Speaker 2"}, files
    assert all(len(c) == 1 for c in files.values()), files  # one colour per speaker
    one, two = files["Speaker 1"], files["Speaker 2"]
    assert one != two and text_colour not in one | two, (files, text_colour)
    assert card.locator(".speaker-label", has_text="Speaker 2").count() >= 1
    page.screenshot(path=str(artifacts / "files-speakers.png"), full_page=True)

    # the History entry: same colours, and a renamed speaker keeps its colour
    result = card.locator(".actions a").first.get_attribute("href") or ""
    entry_id = result.split("/")[3]
    entry = httpx.get(f"{server.url}/api/history/{entry_id}", timeout=10).json()
    segments = [
        {k: s[k] for k in ("id", "start", "end", "text", "speaker") if k in s}
        for s in entry["segments"]
    ]
    response = httpx.patch(
        f"{server.url}/api/history/{entry_id}",
        json={
            "base_revision": entry["revision"],
            "segments": segments,
            "speakers": {"Speaker 1": "Alice"},
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    page.click("#tab-history")
    item = page.locator(f'.history-item[data-id="{entry_id}"]')
    item.wait_for(timeout=10_000)
    item.get_by_role("button", name="Open").click()
    dialog = page.locator("#history-dialog[open]")
    dialog.wait_for()
    history = colours(dialog.locator("#history-dialog-segments"))
    assert history == files, (history, files)
    alice = dialog.locator('.speaker-label[data-speaker="Speaker 1"]').first.inner_text()
    assert alice.startswith("Alice")
    assert (
        dialog.locator('.speaker-label[data-speaker="Speaker 2"]')
        .first.inner_text()
        .startswith("Speaker 2")
    )
    page.screenshot(path=str(artifacts / "history-speakers.png"), full_page=True)

    # dark theme: still two distinct colours, both different from the light ones
    page.evaluate("() => document.documentElement.setAttribute('data-theme', 'dark')")
    dark = colours(dialog.locator("#history-dialog-segments"))
    assert dark["Speaker 1"] != dark["Speaker 2"] and dark["Speaker 1"] != one
    assert errors == []
