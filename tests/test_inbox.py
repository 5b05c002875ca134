"""The inbox (WATCH_DIR, appliance/web/inbox.py) with the real engine on the JFK clip.

Files dropped into the folder come back as .txt/.srt in done/, the original beside them; a
file still being written is not taken early; what is not audio, too large, a link or a pipe
goes to failed/ with a reason, and a link never makes the service read outside the folder;
hostile names and name collisions; a restart resumes what was in flight and does not
transcribe done files again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from quart import Quart

from appliance.system.config import ConfigError, Settings
from appliance.web import inbox
from appliance.web.app import create_app
from appliance.web.services import Services
from tests.conftest import make_settings

SETTLE = 0.4


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "watch_dir": tmp_path / "inbox",
        "watch_settle_seconds": SETTLE,
        "watch_poll_seconds": 0.05,
        "worker_processes": 1,
    }
    values.update(overrides)
    return make_settings(tmp_path / "data", **values)


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Quart]:
    application = create_app(settings)
    async with application.test_app():
        await application.extensions["appliance"].warmed_up()
        yield application


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


async def _until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the inbox")
        await asyncio.sleep(0.05)


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


async def test_drop_half_copied_not_audio_and_names(
    tmp_path: Path, watch: Path, jfk_wav: Path
) -> None:
    """One app run: the acceptance cases of issue 15 item 3 (transcriptions kept few)."""
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret\n")
    audio_bytes = jfk_wav.read_bytes()
    async with _running(_settings(tmp_path)) as app:
        done, failed = watch / "done", watch / "failed"
        # a file written slowly (each chunk sooner than the settle time) is not taken early
        slow = watch / "meeting.wav"
        with slow.open("wb") as out:
            step = len(audio_bytes) // 6
            for start in range(0, len(audio_bytes), step):
                out.write(audio_bytes[start : start + step])
                out.flush()
                await asyncio.sleep(SETTLE / 3)
                assert slow.exists(), "taken while still being written"
                assert not _listing(watch / ".processing")
        # not audio, a link to a file outside, a pipe, a hostile name; a name already in done/
        (watch / "notes.pdf").write_bytes(b"%PDF-1.4 not audio at all\n" * 100)
        (watch / "link.wav").symlink_to(outside)
        os.mkfifo(watch / "pipe.wav")
        hostile = "évènement\n..\\rapport 会议 " + "x" * 200 + ".wav"
        assert len(os.fsencode(hostile)) < 255
        shutil.copyfile(jfk_wav, watch / hostile)
        (done).mkdir(exist_ok=True)
        (done / "dup.srt").write_text("someone else's file\n")
        shutil.copyfile(jfk_wav, watch / "dup.wav")
        (watch / "sub").mkdir()  # folders are not watched
        shutil.copyfile(jfk_wav, watch / "sub" / "inner.wav")

        await _until(lambda: {"meeting.wav", "meeting.txt", "meeting.srt"} <= _listing(done))
        text = (done / "meeting.txt").read_text()
        assert "ask not what your country can do for you" in text.lower()
        assert "ask what you can do for your country" in text.lower()  # the whole file
        srt = (done / "meeting.srt").read_text()
        assert srt.startswith("1\n00:00:00,") and "-->" in srt

        await _until(lambda: "notes.pdf.error.txt" in _listing(failed))
        assert "not audio" in (failed / "notes.pdf.error.txt").read_text()
        assert (failed / "notes.pdf").read_bytes().startswith(b"%PDF")

        await _until(lambda: "link.wav.error.txt" in _listing(failed))
        assert (failed / "link.wav").is_symlink()  # moved as a link, never followed
        assert "symbolic link" in (failed / "link.wav.error.txt").read_text()
        await _until(lambda: "pipe.wav.error.txt" in _listing(failed))

        await _until(lambda: {"dup (2).wav", "dup (2).srt", "dup (2).txt"} <= _listing(done))
        assert (done / "dup.srt").read_text() == "someone else's file\n"  # never overwritten
        stem = hostile[: -len(".wav")]
        await _until(lambda: {hostile, stem + ".srt", stem + ".txt"} <= _listing(done))

        services: Services = app.extensions["appliance"]
        rows, _ = await services.history.list(limit=50)
        inbox_rows = [r for r in rows if r["source"] == "inbox"]
        assert len(inbox_rows) == 3
        assert all("\n" not in r["filename"] for r in inbox_rows)
        for entry in (*_listing(done), *_listing(failed)):
            assert "top secret" not in entry
        assert not any(
            "top secret" in (done / n).read_text() for n in _listing(done) if n.endswith(".txt")
        )
        assert _listing(watch / "sub") == {"inner.wav"}
        assert not _listing(watch / ".processing")
        assert _listing(watch) == {"done", "failed", ".processing", "sub"}


async def test_links_as_folders_never_followed(tmp_path: Path, watch: Path) -> None:
    """`done` made a link to a folder outside: the inbox pauses instead of writing there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (watch / "done").symlink_to(elsewhere)
    (watch / "notes.pdf").write_bytes(b"not audio\n")
    settings = _settings(tmp_path, max_upload_size=5)
    async with _running(settings) as app:
        box = app.extensions["appliance"].inbox
        await _until(lambda: bool(box._problem))
        assert "must be a folder" in box._problem
        await asyncio.sleep(SETTLE * 2)
        assert _listing(elsewhere) == set()
        assert (watch / "notes.pdf").exists()
        (watch / "done").unlink()  # fixed: it goes on
        await _until(lambda: "notes.pdf.error.txt" in _listing(watch / "failed"))
        error = (watch / "failed" / "notes.pdf.error.txt").read_text()
        assert "MAX_UPLOAD_SIZE" in error  # the upload limit applies to dropped files too
        assert _listing(elsewhere) == set()


async def test_restart_resumes_and_does_not_redo(
    tmp_path: Path, watch: Path, jfk_wav: Path
) -> None:
    settings = _settings(tmp_path)
    # a claim the previous run left (killed between taking the file and queueing its job),
    # and a file that arrived while the service was down
    claim = watch / ".processing" / ("a" * 32)
    claim.mkdir(parents=True)
    shutil.copyfile(jfk_wav, claim / "left.wav")
    shutil.copyfile(jfk_wav, watch / "arrived.wav")
    async with _running(settings) as _app:
        done = watch / "done"
        await _until(
            lambda: {"left.txt", "arrived.txt", "left.wav", "arrived.wav"} <= _listing(done)
        )
        await _until(lambda: not (watch / ".processing" / ("a" * 32)).exists())
    before = _listing(watch / "done")
    async with _running(settings) as app:
        await asyncio.sleep(SETTLE * 3)
        rows, _ = await app.extensions["appliance"].history.list(limit=50)
        assert len([r for r in rows if r["source"] == "inbox"]) == 2  # not transcribed again
    assert _listing(watch / "done") == before


async def test_off_by_default_and_vanishing_files(tmp_path: Path, watch: Path) -> None:
    assert Settings.from_env({}).watch_dir is None
    async with _running(make_settings(tmp_path / "data")) as app:
        assert app.extensions["appliance"].inbox is None
    async with _running(_settings(tmp_path)) as _app:
        part = watch / "copying.wav"
        part.write_bytes(b"RIFF" + b"\0" * 1000)
        await asyncio.sleep(SETTLE / 4)
        part.unlink()  # the copy was cancelled
        await asyncio.sleep(SETTLE * 3)
        assert _listing(watch / "failed") == set()
        assert _listing(watch / "done") == set()


def test_settings() -> None:
    s = Settings.from_env(
        {"WATCH_DIR": "/srv/in", "WATCH_FORMATS": "SRT, txt,vtt,json", "WATCH_LANGUAGE": "de"}
    )
    assert s.watch_dir == Path("/srv/in")
    assert s.watch_formats == ("srt", "txt", "vtt", "json")
    assert s.watch_language == "de"
    assert Settings.from_env({"WATCH_LANGUAGE": "auto"}).watch_language == ""
    for env in ({"WATCH_FORMATS": "docx"}, {"WATCH_FORMATS": ""}, {"WATCH_LANGUAGE": "xx"}):
        with pytest.raises(ConfigError, match="WATCH_"):
            Settings.from_env(env)


def test_result_names_fit_and_never_collide() -> None:
    long = "é" * 127 + ".mp3"  # 258 bytes is refused by the file system; 254 + .mp3 is not
    names = inbox._names(long, 12, (".json", ".txt"), ("json", "txt"))
    assert all(len(os.fsencode(n)) <= inbox.NAME_MAX for n in names)
    assert names[0].endswith(" (12).mp3") and names[1].endswith(" (12).json")
    original, error = inbox._failed_names("a" * 250 + ".bin", 1)
    assert len(os.fsencode(error)) <= inbox.NAME_MAX and error == original + ".error.txt"
    assert inbox._names("notes.txt", 1, (".txt",), ("txt",)) == ["notes.txt", "notes.txt.txt"]
    assert inbox.display_name("a\nb\x00c/../d.wav") == "d.wav"
    assert inbox.display_name(os.fsdecode(b"caf\xe9.wav")) == "caf\ufffd.wav"
