"""The whisper-asr-webservice API (`/asr`, `/detect-language`) as Bazarr and others call it.

The Bazarr tests send exactly what Bazarr's Whisper provider sends
(custom_libs/subliminal_patch/providers/whisperai.py, before and after it gained the
"pass video name" option): a `requests.Session` with its User-Agent, `encode=false` in the
query (and `video_file`, the film's path, or None, which requests leaves out), the audio as
FFmpeg's raw s16le 16 kHz mono PCM in a `files={'audio_file': bytes}` part (so no
Content-Type and the file name `audio_file`), and they read the answer the way it does.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import requests
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.core import audio, history
from appliance.core.db import Database
from appliance.core.engines.base import Segment, Transcript
from appliance.core.history import History
from appliance.web.app import create_app
from tests.conftest import JFK_TEXT, Server, make_settings
from tests.wer import normalise, wer

BAZARR_UA = "Subliminal/2.1"
TIMEOUT = (5, 120)  # Bazarr's (response, timeout) settings
SEGMENT_KEYS = [
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
    "words",
    "temperature",
]


def bazarr_pcm(path: Path) -> bytes:
    """Bazarr's encode_audio_stream: ffmpeg to s16le, mono, 16 kHz, aresample=async=1."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:  # the same samples, decoded by the appliance's own FFmpeg (PyAV)
        return (audio.decode(path) * 32768).clip(-32768, 32767).astype("<i2").tobytes()
    cmd = [ffmpeg, "-nostdin", "-threads", "0", "-i", str(path)]
    cmd += ["-f", "s16le", "-acodec", "pcm_s16le", "-ac", "1", "-ar", "16000"]
    cmd += ["-af", "aresample=async=1", "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def session() -> requests.Session:
    s = requests.Session()  # WhisperAIProvider.initialize
    s.headers["User-Agent"] = BAZARR_UA
    return s


@pytest.fixture(scope="module")
def jfk_pcm(jfk_wav: Path) -> bytes:
    return bazarr_pcm(jfk_wav)


VIDEO = "/media/movies/Inaugural Address (1961)/Inaugural Address (1961).mkv"


@pytest.mark.parametrize("video_name", [None, VIDEO])
def test_bazarr_detect_language(
    server: Server, session: requests.Session, jfk_pcm: bytes, video_name: str | None
) -> None:
    # WhisperAIProvider.detect_language
    r = session.post(
        f"{server.url}/detect-language",
        params={"encode": "false", "video_file": video_name},
        files={"audio_file": jfk_pcm},
        timeout=TIMEOUT,
    )
    results = r.json()
    assert results.get("language_code") and results["language_code"] != "und"
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["detected_language"] == "english"
    assert r.json()["language_code"] == "en"
    assert set(r.json()) == {"detected_language", "language_code", "confidence"}
    assert 0 < r.json()["confidence"] <= 1


@pytest.mark.parametrize(
    "params",
    [
        # Bazarr up to 1.4
        {"task": "transcribe", "language": "en", "output": "srt", "encode": "false"},
        # Bazarr 1.5, "pass video name" off (requests drops the None) and on
        {
            "task": "transcribe",
            "language": "en",
            "output": "srt",
            "encode": "false",
            "video_file": None,
        },
        {
            "task": "transcribe",
            "language": "en",
            "output": "srt",
            "encode": "false",
            "video_file": VIDEO,
        },
    ],
)
def test_bazarr_transcribe_srt(
    server: Server, session: requests.Session, jfk_pcm: bytes, params: dict[str, str | None]
) -> None:
    # WhisperAIProvider.download_subtitle
    r = session.post(
        f"{server.url}/asr", params=params, files={"audio_file": jfk_pcm}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    content = r.content  # subtitle.content = r.content
    assert len(content) > 0
    text = content.decode("utf-8")
    blocks = text.split("\n\n")
    assert blocks[-1] == ""  # every block ends with a blank line, as the original's print()s
    cues = [b.split("\n") for b in blocks[:-1]]
    for number, cue in enumerate(cues, start=1):
        assert cue[0] == str(number)
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", cue[1]), cue
    assert cues[0][1].startswith("00:00:00,000 --> ")
    assert wer(JFK_TEXT, " ".join(" ".join(c[2:]) for c in cues)) == 0.0
    assert r.headers["Content-Disposition"] == 'attachment; filename="audio_file.srt"'
    assert r.headers["Asr-Engine"] == "faster_whisper"
    if params.get("video_file"):  # the history names the film
        items = httpx.get(f"{server.url}/api/history", params={"limit": 1}).json()["items"]
        assert items[0]["filename"] == "Inaugural Address (1961).mkv"
        assert items[0]["source"] == "asr"


def test_bazarr_translate(server: Server, session: requests.Session, jfk_pcm: bytes) -> None:
    # a track in another language, English subtitles wanted: task=translate
    r = session.post(
        f"{server.url}/asr",
        params={"task": "translate", "language": "en", "output": "srt", "encode": "false"},
        files={"audio_file": jfk_pcm},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert "your country" in normalise(r.text)


def post_asr(server: Server, path: Path, **params: str) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{server.url}/asr",
            params=params,
            files={"audio_file": (path.name, f, "audio/wav")},
            timeout=120,
        )


def test_every_output_on_the_real_clip(server: Server, jfk_wav: Path) -> None:
    answers = {}
    for output in ("txt", "vtt", "srt", "tsv", "json"):
        r = post_asr(server, jfk_wav, output=output, language="en")
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["Content-Disposition"] == f'attachment; filename="jfk.wav.{output}"'
        answers[output] = r.text
    # json: {"language", "segments" (faster-whisper's Segment fields), "text"}
    data = json.loads(answers["json"])
    assert list(data) == ["language", "segments", "text"]
    assert data["language"] == "en"
    assert wer(JFK_TEXT, data["text"]) == 0.0
    assert data["text"].startswith(" ")  # the segments' texts joined, not stripped
    segments = data["segments"]
    assert [list(s) for s in segments] == [SEGMENT_KEYS] * len(segments)
    assert segments[0]["id"] == 1 and segments[0]["start"] == 0.0
    assert all(s["words"] is None for s in segments)
    texts = [s["text"].strip() for s in segments]
    # txt: one line per segment
    assert answers["txt"] == "".join(f"{t}\n" for t in texts)
    # vtt: WEBVTT, a blank line, then cues with MM:SS.mmm under an hour
    vtt = answers["vtt"]
    assert vtt.startswith("WEBVTT\n\n00:00.000 --> ")
    cue_times = re.findall(r"^\d\d:\d\d\.\d{3} --> \d\d:\d\d\.\d{3}$", vtt, re.M)
    assert len(cue_times) == len(texts)
    assert vtt.endswith(f"{texts[-1]}\n\n")
    # srt: numbered cues with HH:MM:SS,mmm
    srt = answers["srt"]
    assert srt.startswith("1\n00:00:00,000 --> ")
    assert srt.endswith(f"{texts[-1]}\n\n")
    # tsv: a header, then integer milliseconds
    tsv = answers["tsv"].splitlines()
    assert tsv[0] == "start\tend\ttext"
    rows = [line.split("\t") for line in tsv[1:]]
    assert [r[2] for r in rows] == texts
    assert rows[0][0] == "0"
    assert int(rows[-1][1]) == round(segments[-1]["end"] * 1000)


def test_options_word_timestamps_vad_prompt(server: Server, clips: Path) -> None:
    r = post_asr(
        server,
        clips / "jfk.mp3",
        output="json",
        word_timestamps="true",
        vad_filter="true",
        initial_prompt="John F. Kennedy inaugural address.",
    )
    assert r.status_code == 200, r.text
    data = r.json()
    words = [w for s in data["segments"] for w in s["words"]]
    assert list(words[0]) == ["start", "end", "word", "probability"]
    assert "americans" in [w["word"].strip(" ,.").lower() for w in words]
    assert data["language"] == "en"  # detected: no language given


def test_defaults_txt_and_encode_true(server: Server, jfk_wav: Path) -> None:
    with jfk_wav.open("rb") as f:  # no query at all: encode=true, task=transcribe, output=txt
        r = httpx.post(f"{server.url}/asr", files={"audio_file": f}, timeout=120)
    assert r.status_code == 200, r.text
    assert wer(JFK_TEXT, r.text.replace("\n", " ")) == 0.0
    detected = httpx.post(
        f"{server.url}/detect-language",
        files={"audio_file": ("jfk.wav", jfk_wav.read_bytes())},
        timeout=120,
    )
    assert detected.status_code == 200, detected.text
    assert detected.json()["language_code"] == "en"


def test_history_source_asr(server: Server, jfk_wav: Path) -> None:
    r = post_asr(server, jfk_wav, output="txt")
    assert r.status_code == 200
    listed = httpx.get(f"{server.url}/api/history", params={"limit": 5}).json()
    assert any(e["source"] == "asr" and e["filename"] == "jfk.wav" for e in listed["items"])


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"output": "xml"}, "output"),
        ({"task": "summarise"}, "task"),
        ({"language": "klingon"}, "language"),
        ({"encode": "maybe"}, "encode"),
        ({"word_timestamps": "2"}, "word_timestamps"),
        ({"vad_filter": "sometimes"}, "vad_filter"),
    ],
)
def test_invalid_query_is_422_like_fastapi(
    server: Server, jfk_wav: Path, params: dict[str, str], loc: str
) -> None:
    r = post_asr(server, jfk_wav, **params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["detail"][0]["loc"] == ["query", loc]
    assert body["error"]["code"] == "invalid_request"


def test_bad_bodies_are_4xx_json(server: Server, jfk_wav: Path) -> None:
    for route in ("/asr", "/detect-language"):
        url = f"{server.url}{route}"
        # no audio_file part (the wrong field name), or no multipart at all: FastAPI's 422
        wrong = httpx.post(url, files={"file": jfk_wav.read_bytes()}, timeout=30)
        assert wrong.status_code in (400, 422), wrong.text
        none = httpx.post(url, content=b"hello", timeout=30)
        assert none.status_code == 422, none.text
        assert none.json()["detail"][0]["loc"] == ["body", "audio_file"]
        # not audio, decoded with FFmpeg
        text = httpx.post(url, files={"audio_file": ("a.wav", b"not audio " * 100)}, timeout=30)
        assert text.status_code == 415, text.text
        assert text.json()["error"]["code"] == "unsupported_audio"
        # raw PCM too short to hold one sample, and an empty file
        one = httpx.post(url, params={"encode": "false"}, files={"audio_file": b"x"}, timeout=30)
        assert one.status_code == 415, one.text
        empty = httpx.post(url, files={"audio_file": ("a.wav", b"")}, timeout=30)
        assert empty.status_code == 400, empty.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.fixture
async def keyed_app(tmp_path: Path) -> AsyncIterator[Quart]:
    application = create_app(make_settings(tmp_path / "data", require_api_key=True))
    async with application.test_app():
        await application.extensions["appliance"].warmed_up()
        yield application


async def test_api_keys_and_upload_limit(keyed_app: Quart, jfk_wav: Path) -> None:
    services = keyed_app.extensions["appliance"]
    _row, key = await services.auth.create_key("bazarr")
    client = keyed_app.test_client()

    def files(data: bytes) -> dict[str, FileStorage]:
        return {"audio_file": FileStorage(io.BytesIO(data), filename="audio_file")}

    pcm = bazarr_pcm(jfk_wav)
    for route in ("/asr", "/detect-language"):
        refused = await client.post(route, query_string={"encode": "false"}, files=files(pcm))
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        bad = await client.post(
            route,
            query_string={"encode": "false"},
            files=files(pcm),
            headers={"Authorization": "Bearer wa_nope_nope"},
        )
        assert bad.status_code == 401
    ok = await client.post(
        "/asr",
        query_string={"encode": "false", "output": "txt", "language": "en"},
        files=files(pcm),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert ok.status_code == 200, await ok.get_data(as_text=True)
    assert "ask not what your country" in normalise(await ok.get_data(as_text=True))
    # the upload limit (runtime setting) holds here too
    services.runtime.max_upload_size = 1000
    big = await client.post(
        "/asr",
        query_string={"encode": "false"},
        files=files(pcm),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert big.status_code == 413
    assert (await big.get_json())["error"]["code"] == "file_too_large"


async def test_history_migration_keeps_entries_and_search(tmp_path: Path) -> None:
    """The table rebuild that allows source `asr` keeps old entries, their search and deletes."""
    db = await Database.open(tmp_path / "history.db")
    try:
        await db.migrate("history", history.MIGRATIONS[:1])  # a database from before
        old = History(db)
        t = Transcript("ask not what your country", [Segment(0, 0, 1, "ask not")], "en", 1.0)
        kept = await old.add(t, source="upload", model="tiny.en", filename="jfk.wav")
        await old.migrate()
        new = await old.add(t, source="asr", model="tiny.en", filename="bazarr.mkv")
        found, total = await old.list("country")
        assert total == 2 and {e["id"] for e in found} == {kept, new}
        assert (await old.list("bazarr"))[0][0]["source"] == "asr"
        assert await old.delete(kept)
        assert [e["id"] for e in (await old.list("country"))[0]] == [new]
    finally:
        await db.close()
