"""The transcript editor in a real headless Chromium, driven with the keyboard: edit, split,
merge, nudge, rename a speaker, undo/redo, play a segment, save, reload and find the revision,
the SRT export following it, and a second tab's stale save refused with a 409."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import LaunchBrowser, watch
from tests.conftest import Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FIRST = "And so my fellow Americans"
SECOND = "ask not what your country can do for you, ask what you can do for your country."


@pytest.fixture
def entry(server: Server, jfk_wav: Path) -> dict[str, Any]:
    """JFK transcribed, then set to two known segments with two speakers (as diarization
    would label them) through the API: revision 1."""
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{server.url}/api/jobs",
            files={"file": ("jfk-editor.wav", f, "audio/wav")},
            timeout=60,
        )
    assert response.status_code == 202, response.text
    job = response.json()
    for _ in range(300):
        state = httpx.get(f"{server.url}/api/jobs/{job['id']}", timeout=10).json()
        if state["state"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert state["state"] == "done", state
    entry_id = httpx.get(
        f"{server.url}/api/jobs/{job['id']}/result?format=json", timeout=10
    ).json()["id"]
    segments = [
        {"start": 0.0, "end": 3.9, "text": FIRST, "speaker": "SPEAKER_1"},
        {"start": 3.9, "end": 10.5, "text": SECOND, "speaker": "SPEAKER_2"},
    ]
    response = httpx.patch(
        f"{server.url}/api/history/{entry_id}",
        json={"base_revision": 0, "segments": segments},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def open_editor(browser: Any, server: Server, entry_id: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1300, "height": 950})
    errors = watch(page)
    page.goto(f"{server.url}/#history")
    edit(page, entry_id)
    return page, errors


def edit(page: Any, entry_id: str) -> None:
    """From a freshly loaded page on the History panel: open the entry and its editor."""
    page.wait_for_selector("body[data-ready=true]")
    item = page.locator(f'.history-item[data-id="{entry_id}"]')
    item.wait_for(timeout=10_000)
    item.get_by_role("button", name="Open").click()
    page.wait_for_selector("#history-dialog[open]")
    page.click("#history-edit")
    page.wait_for_selector("#history-editor .editor-segment textarea")
    # the comparison column is filled once the revisions are loaded
    page.wait_for_function(
        "() => document.querySelectorAll('#editor-compare option').length > 0"
        " && [...document.querySelectorAll('.editor-compare')].some((n) => n.textContent)"
    )


def texts(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all(
            "#history-editor .editor-segment textarea", "nodes => nodes.map(n => n.value)"
        )
    )


def caret(page: Any, index: int, position: int) -> None:
    """Focus segment `index` with the caret at `position` (-1: the end)."""
    page.eval_on_selector_all(
        "#history-editor .editor-segment textarea",
        """(nodes, [i, at]) => {
          const area = nodes[i];
          area.focus();
          const p = at < 0 ? area.value.length : at;
          area.setSelectionRange(p, p);
        }""",
        [index, position],
    )


def test_edit_split_merge_rename_undo_save_reload(
    launch_browser: LaunchBrowser,
    server: Server,
    entry: dict[str, Any],
    jfk_wav: Path,
    artifacts: Path,
) -> None:
    entry_id = entry["id"]
    browser = launch_browser()
    page, errors = open_editor(browser, server, entry_id)
    assert texts(page) == [FIRST, SECOND]
    assert page.get_attribute("#history-editor", "data-revision") == "1"

    # edit: type at the end of the first segment
    caret(page, 0, -1)
    page.keyboard.type(" today")
    assert texts(page)[0] == f"{FIRST} today"
    assert page.locator(".editor-segment").first.get_attribute("class").endswith("changed")

    # split the second segment at the caret with Enter
    caret(page, 1, SECOND.index(" ask what"))
    page.keyboard.press("Enter")
    assert texts(page) == [
        f"{FIRST} today",
        "ask not what your country can do for you,",
        "ask what you can do for your country.",
    ]
    times = page.eval_on_selector_all(".editor-segment .time", "n => n.map(x => x.textContent)")
    assert times[3] == times[4]  # the first half ends where the second half starts

    # merge the (new) second segment into the first with Backspace at its start
    assert page.evaluate("() => document.activeElement.selectionStart") == 0
    caret(page, 1, 0)
    page.keyboard.press("Backspace")
    assert texts(page) == [
        f"{FIRST} today ask not what your country can do for you,",
        "ask what you can do for your country.",
    ]

    # nudge: Alt+Shift+Right moves the end of segment 1 later, Alt+Left its start earlier
    caret(page, 1, 0)
    before = page.locator(".editor-segment .time.start").nth(1).inner_text()
    page.keyboard.press("Alt+ArrowRight")
    after = page.locator(".editor-segment .time.start").nth(1).inner_text()
    assert before != after
    page.keyboard.press("Alt+ArrowLeft")
    assert page.locator(".editor-segment .time.start").nth(1).inner_text() == before
    page.keyboard.press("Alt+Shift+ArrowLeft")
    end = page.locator(".editor-segment .time.end").nth(1).inner_text()
    assert end == "00:10.4", end

    # rename a speaker
    name = page.locator('.speaker-name[data-label="SPEAKER_1"]')
    name.click()
    page.keyboard.type("Alice")
    assert "Alice" in page.locator(".editor-segment select.speaker").first.inner_text()

    # undo / redo with the keyboard: a typo in the second segment comes and goes
    caret(page, 1, -1)
    page.keyboard.type(" oops")
    assert texts(page)[1].endswith("oops")
    page.keyboard.press("Control+z")
    assert texts(page)[1] == "ask what you can do for your country."
    page.keyboard.press("Control+Shift+z")
    assert texts(page)[1].endswith("oops")
    page.keyboard.press("Control+z")
    assert texts(page)[1] == "ask what you can do for your country."
    assert page.input_value('.speaker-name[data-label="SPEAKER_1"]') == "Alice"

    # play the segment being edited, from the original file chosen in the editor
    page.set_input_files("#editor-audio-file", str(jfk_wav))
    caret(page, 1, 0)
    page.keyboard.press("Control+Enter")
    page.wait_for_function(
        "() => { const a = document.querySelector('#history-editor audio');"
        " return a.currentTime >= 3.9 && !a.paused; }",
        timeout=10_000,
    )
    page.screenshot(path=str(artifacts / "editor.png"), full_page=True)

    # save with Ctrl+S: revision 2
    page.keyboard.press("Control+s")
    page.wait_for_function(
        "() => document.getElementById('history-editor').dataset.revision === '2'"
        " && document.getElementById('history-editor').dataset.dirty === 'false'"
    )
    assert "Saved as revision 2" in page.inner_text(".editor-status")

    # reload: the saved revision is what opens, and it is in the list of revisions
    page.reload()
    edit(page, entry_id)
    assert texts(page) == [
        f"{FIRST} today ask not what your country can do for you,",
        "ask what you can do for your country.",
    ]
    assert page.input_value('.speaker-name[data-label="SPEAKER_1"]') == "Alice"
    options = page.locator("#editor-compare option").all_inner_texts()
    assert options[0].startswith("Original") and any(o.startswith("Revision 2") for o in options)
    # the comparison column shows the original (Whisper's own text) next to the edit
    assert "Americans" in " ".join(page.locator(".editor-compare").all_inner_texts())

    # the SRT export reflects the edit and the speaker's name
    srt = httpx.get(f"{server.url}/api/history/{entry_id}/export?format=srt", timeout=10).text
    assert "[Alice] And so my fellow Americans today ask not what" in srt, srt
    assert "[SPEAKER_2] ask what you can do for your country." in srt, srt
    assert "00:00:10,400" in srt

    # a second tab edits the same revision; the first saves; the second's save is a 409
    other, other_errors = open_editor(browser, server, entry_id)
    caret(page, 1, -1)
    page.keyboard.type(" Thank you.")
    page.keyboard.press("Control+s")
    page.wait_for_function(
        "() => document.getElementById('history-editor').dataset.revision === '3'"
    )
    caret(other, 0, 0)
    other.keyboard.type("Well, ")
    other.keyboard.press("Control+s")
    other.wait_for_selector(".editor-conflict:not([hidden])")
    assert "revision 3" in other.inner_text(".editor-conflict")
    current = httpx.get(f"{server.url}/api/history/{entry_id}", timeout=10).json()
    assert current["revision"] == 3 and "Thank you." in current["text"]
    assert "Well," not in current["text"]
    # the second tab may still keep its version, explicitly, as a newer revision
    other.get_by_role("button", name="Save mine as a newer revision").click()
    other.wait_for_function(
        "() => document.getElementById('history-editor').dataset.revision === '4'"
    )
    revisions = httpx.get(f"{server.url}/api/history/{entry_id}/revisions", timeout=10).json()
    assert [r["revision"] for r in revisions["revisions"]] == [0, 1, 2, 3, 4]
    assert errors == [], errors
    # Chromium logs every 4xx response; the expected 409 is the only thing the second tab saw
    assert [e for e in other_errors if "status of 409" not in e] == [], other_errors
