"""Job queue behaviour on a real server: bounded queue, positions, ETA, disconnects."""

from __future__ import annotations

import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.core import audio
from appliance.core.engines.base import SAMPLE_RATE
from tests.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("jobs") / "data",
        env={"WORKER_PROCESSES": "1", "MAX_QUEUE": "2"},
    )
    yield srv
    stop_server(srv)


def submit(server: Server, path: Path) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{server.url}/api/jobs", files={"file": (path.name, f)}, timeout=60)


def wait_done(server: Server, job_id: str, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def six_minutes(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About six minutes of real speech (the clips, nine times): a job that keeps the single
    worker busy for seconds even at batched speed, so the queue behind it can be looked at."""
    pieces = [clips / "jfk.wav", *sorted((clips / "librivox").glob("*.wav"))] * 9
    path = tmp_path_factory.mktemp("six") / "six-minutes.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        for piece in pieces:
            out.writeframes((audio.decode(piece) * 32767).astype("<i2").tobytes())
    return path


def test_queue_positions_eta_and_429(one_worker: Server, clips: Path, six_minutes: Path) -> None:
    wav = sorted((clips / "librivox").glob("*.wav"))[0]
    first = submit(one_worker, six_minutes).json()
    deadline = time.monotonic() + 60  # the single worker picks the long job up
    while httpx.get(f"{one_worker.url}/api/jobs/{first['id']}", timeout=10).json()["state"] == (
        "queued"
    ):
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.05)
    queued = [submit(one_worker, wav).json() for _ in range(2)]
    assert [q["position"] for q in queued] == [1, 2]
    assert all(q["state"] == "queued" for q in queued)
    assert 0 < queued[0]["eta_seconds"] < queued[1]["eta_seconds"]
    refused = submit(one_worker, wav)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert list((one_worker.data_dir / "tmp").iterdir()).__len__() <= 3
    for job in [first, *queued]:
        assert wait_done(one_worker, str(job["id"]))["state"] == "done"
    assert list((one_worker.data_dir / "tmp").iterdir()) == []


def test_job_survives_client_disconnect(one_worker: Server, jfk_wav: Path) -> None:
    before = httpx.get(f"{one_worker.url}/api/history", timeout=10).json()["total"]
    with jfk_wav.open("rb") as f, pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_worker.url}/transcribe", files={"file": ("gone.wav", f)}, timeout=0.3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page = httpx.get(f"{one_worker.url}/api/history", params={"q": "gone"}, timeout=10).json()
        if page["total"]:
            break
        time.sleep(0.3)
    assert page["items"][0]["filename"] == "gone.wav"
    assert "country" in page["items"][0]["text"].lower()
    assert httpx.get(f"{one_worker.url}/api/history", timeout=10).json()["total"] == before + 1


def test_running_job_can_be_cancelled(one_worker: Server, clips: Path) -> None:
    wav = sorted((clips / "librivox").glob("*.wav"))[1]
    job = submit(one_worker, wav).json()
    deadline = time.monotonic() + 30
    while (
        httpx.get(f"{one_worker.url}/api/jobs/{job['id']}", timeout=10).json()["state"] == "queued"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    httpx.delete(f"{one_worker.url}/api/jobs/{job['id']}", timeout=10)
    final = wait_done(one_worker, job["id"])
    assert final["state"] in ("cancelled", "done")  # a short clip may finish first
    assert list((one_worker.data_dir / "tmp").iterdir()) == []
