"""The HTTP API end to end on a real Hypercorn server, real engine, real speech."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import JFK_TEXT, Server
from tests.wer import normalise, wer


def post_file(
    server: Server, path: Path, route: str = "/transcribe", **fields: str
) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{server.url}{route}", files={"file": (path.name, f)}, data=fields, timeout=120
        )


def test_jfk_wav_gives_the_sentence(server: Server, jfk_wav: Path) -> None:
    response = post_file(server, jfk_wav)
    assert response.status_code == 200, response.text
    body = response.json()
    assert wer(JFK_TEXT, body["text"]) == 0.0
    assert body["language"] == "en"
    assert body["model"] == "tiny.en"
    assert body["duration"] == pytest.approx(11.0, abs=0.1)
    assert body["segments"][0]["start"] == 0.0
    assert body["timings"]["realtime_factor"] > 1


def test_mp3_and_word_timestamps(server: Server, clips: Path) -> None:
    response = post_file(server, clips / "jfk.mp3", word_timestamps="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert "ask not what your country can do for you" in normalise(body["text"])
    words = [w["word"].lower().strip(",.") for w in body["words"]]
    assert "americans" in words
    assert all(w["end"] >= w["start"] for w in body["words"])


def test_librivox_wer_under_ten_percent(server: Server, clips: Path) -> None:
    refs, hyps = [], []
    for wav in sorted((clips / "librivox").glob("*.wav")):
        response = post_file(server, wav)
        assert response.status_code == 200, response.text
        refs.append(wav.with_suffix(".txt").read_text())
        hyps.append(response.json()["text"])
    total = wer(" ".join(refs), " ".join(hyps))
    assert total <= 0.10, f"WER {total:.1%}"


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv"])
def test_text_formats(server: Server, jfk_wav: Path, fmt: str) -> None:
    response = post_file(server, jfk_wav, format=fmt)
    assert response.status_code == 200, response.text
    text = response.text
    assert "ask not what your country" in normalise(text)
    if fmt == "srt":
        assert text.startswith("1\n00:00:00,000 --> ")
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n00:00:00.000 --> ")
    if fmt == "tsv":
        assert text.startswith("start\tend\ttext\n0\t")


def test_job_api_with_events_and_result(server: Server, jfk_wav: Path) -> None:
    response = post_file(server, jfk_wav, route="/api/jobs")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running")
    events = []
    with httpx.stream("GET", f"{server.url}/api/jobs/{job['id']}/events", timeout=120) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "done":
                    break
    assert events[-1][0] == "done"
    assert events[-1][1]["state"] == "done"
    assert events[-1][1]["percent"] == 100.0
    result = httpx.get(f"{server.url}/api/jobs/{job['id']}/result?format=txt", timeout=30)
    assert "ask not what your country" in normalise(result.text)
    entry = httpx.get(f"{server.url}/api/history/{events[-1][1]['history_id']}", timeout=30).json()
    assert entry["source"] == "upload"
    assert entry["filename"] == "jfk.wav"


def test_cancel_a_job(server: Server, clips: Path) -> None:
    wavs = sorted((clips / "librivox").glob("*.wav"))
    ids = [post_file(server, wav, route="/api/jobs").json()["id"] for wav in wavs]
    last = ids[-1]
    cancelled = httpx.delete(f"{server.url}/api/jobs/{last}", timeout=30).json()
    assert cancelled["state"] == "cancelled"
    result = httpx.get(f"{server.url}/api/jobs/{last}/result", timeout=30)
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "cancelled"
    assert httpx.get(f"{server.url}/api/jobs/nope", timeout=30).status_code == 404


def test_history_search_export_delete(server: Server, jfk_wav: Path) -> None:
    entry_id = post_file(server, jfk_wav).json()["id"]
    found = httpx.get(f"{server.url}/api/history", params={"q": "fellow americ"}, timeout=30).json()
    assert entry_id in [item["id"] for item in found["items"]]
    none = httpx.get(f"{server.url}/api/history", params={"q": 'zebra OR "*'}, timeout=30).json()
    assert none["total"] == 0
    for fmt, marker in [
        ("srt", "-->"),
        ("vtt", "WEBVTT"),
        ("tsv", "start\tend"),
        ("txt", "fellow"),
    ]:
        exported = httpx.get(
            f"{server.url}/api/history/{entry_id}/export", params={"format": fmt}, timeout=30
        )
        assert exported.status_code == 200
        assert marker in exported.text
    as_json = httpx.get(f"{server.url}/api/history/{entry_id}/export?format=json", timeout=30)
    assert as_json.json()["segments"][0]["start"] == 0.0
    assert (
        httpx.get(f"{server.url}/api/history/{entry_id}/export?format=doc", timeout=30).status_code
        == 400
    )
    assert httpx.delete(f"{server.url}/api/history/{entry_id}", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/api/history/{entry_id}", timeout=30).status_code == 404


def test_status_health_and_docs(server: Server) -> None:
    status = httpx.get(f"{server.url}/api/status", timeout=30).json()
    assert status["engine"] == "faster-whisper"
    assert status["queue"]["workers"] == 2
    assert any(m["name"] == "tiny.en" and m["state"] == "loaded" for m in status["models"])
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok"
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for path in ("/transcribe", "/v1/audio/transcriptions", "/api/jobs/{job_id}", "/api/history"):
        assert path in schema["paths"], path
    docs = httpx.get(f"{server.url}/docs", timeout=30)
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower()
    bundle = httpx.get(f"{server.url}/static/vendor/swagger-ui/swagger-ui-bundle.js", timeout=30)
    assert bundle.status_code == 200
