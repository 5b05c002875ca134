"""Two appliances on one PostgreSQL (issue 16, item 2): a job sent to one node is seen, followed
and run on the other, and a node killed with SIGKILL while it runs a job loses nothing: the
other node takes the job over when its lease expires and the history has it once.

Real servers, the real engine (tiny.en) and real clips. The test starts its own PostgreSQL
(`tests/pgserver.py`), so it runs whatever APPLIANCE_TEST_DB says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest

from appliance.core import jobs
from appliance.core.db import AnyDatabase, open_database
from appliance.core.engines.base import TranscribeOptions
from appliance.core.jobs import Job, JobQueue, JobState
from appliance.core.model_manager import ModelManager
from tests.conftest import CLIPS, Server, start_server, stop_server
from tests.pgserver import PgServer
from tests.test_job_durability import (
    _job,
    _long_clip,
    _NoModels,
    _reference,
    _submit,
    _wait_finished,
)
from tests.wer import wer

pytestmark = pytest.mark.slow

LEASE_SECONDS = "3"  # short, so that a take-over is quick


@pytest.fixture
def shared_url(shared_pg: PgServer) -> str:
    return shared_pg.new_database()


def _node(data_dir: Path, url: str) -> Server:
    env = {"DATABASE_URL": url, "WORKER_PROCESSES": "1", "JOB_LEASE_SECONDS": LEASE_SECONDS}
    return start_server(data_dir, env=env)


def _query(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, args).fetchall())


def _events(server: Server, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The server-sent events of a job, read until the stream ends (after `done`)."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_job_sent_to_one_node_is_followed_and_run_on_another(
    tmp_path: Path, shared_url: str
) -> None:
    librivox = sorted((CLIPS / "librivox").glob("*.wav"))
    long = _long_clip([CLIPS / "jfk.wav", *librivox[:3]], tmp_path / "long.wav")
    clips = [long, *librivox[:3]]
    a = _node(tmp_path / "a", shared_url)
    try:
        b = _node(tmp_path / "b", shared_url)
        try:
            accepted = [_submit(a, clip) for clip in clips]  # all of them to node A
            seen = _job(b, accepted[0]["id"])  # B reads A's job from the shared table
            assert seen["id"] == accepted[0]["id"]
            assert seen["filename"] == long.name
            events = _events(b, accepted[-1]["id"])  # followed on B, wherever it runs
            assert events[-1][0] == "done"
            assert events[-1][1]["state"] == "done"
            assert events[-1][1]["text"]
            assert all(name == "progress" for name, _ in events[:-1])
            for job, clip in zip(accepted, clips, strict=True):
                final = _wait_finished(b, job["id"], timeout=120)
                assert final["state"] == "done", final
                assert wer(_reference(clip), final["text"]) < 0.4, (clip.name, final["text"])
                assert _job(a, job["id"])["history_id"] == final["history_id"]
            # A's worker was busy with the long file: B took queued work sent to A
            nodes = {row[0] for row in _query(shared_url, "SELECT node FROM jobs")}
            assert len(nodes) == 2, nodes
            history = httpx.get(f"{b.url}/api/history", params={"limit": 50}, timeout=10).json()
            assert history["total"] == len(accepted)
        finally:
            stop_server(b)
    finally:
        stop_server(a)
    assert _query(shared_url, "SELECT count(*) FROM job_audio")[0][0] == 0


def test_a_killed_node_s_job_is_finished_by_another(tmp_path: Path, shared_url: str) -> None:
    librivox = sorted((CLIPS / "librivox").glob("*.wav"))
    long = _long_clip([CLIPS / "jfk.wav", *librivox[:3]], tmp_path / "long.wav")
    clips = [long, librivox[0], librivox[3]]
    a = _node(tmp_path / "a", shared_url)
    try:
        accepted = [_submit(a, clip) for clip in clips]
        deadline = time.monotonic() + 30
        while _job(a, accepted[0]["id"])["state"] != "running":
            assert time.monotonic() < deadline, a.output()[-3000:]
            time.sleep(0.02)
        # one more, cancelled while it waits: no node runs it, before or after the kill
        cancelled = _submit(a, librivox[1])
        response = httpx.delete(f"{a.url}/api/jobs/{cancelled['id']}", timeout=10)
        assert response.json()["state"] == "cancelled"
        os.kill(a.process.pid, signal.SIGKILL)  # no shutdown: the row stays `running`
        a.process.wait(timeout=20)
    finally:
        if a.process.poll() is None:
            a.process.kill()
    dead = (tmp_path / "a" / "node-id").read_text().strip()
    assert _query(shared_url, "SELECT state, node FROM jobs WHERE id = %s", (accepted[0]["id"],))[
        0
    ] == ("running", dead)

    b = _node(tmp_path / "b", shared_url)
    try:
        for job, clip in zip(accepted, clips, strict=True):
            final = _wait_finished(b, job["id"], timeout=120)
            assert final["state"] == "done", final
            assert wer(_reference(clip), final["text"]) < 0.4, (clip.name, final["text"])
        assert "its node stopped while running it" in b.output()
        assert _job(b, cancelled["id"])["state"] == "cancelled"
    finally:
        stop_server(b)
    taken_over = _query(
        shared_url, "SELECT node, attempts FROM jobs WHERE id = %s", (accepted[0]["id"],)
    )[0]
    assert taken_over == ((tmp_path / "b" / "node-id").read_text().strip(), 2)
    history_ids = _query(shared_url, "SELECT history_id FROM jobs WHERE history_id IS NOT NULL")
    transcripts = _query(shared_url, "SELECT id FROM transcripts")
    assert len(history_ids) == len(accepted)
    assert sorted(history_ids) == sorted(transcripts)  # each job once, nothing else
    assert _query(shared_url, "SELECT count(*) FROM job_audio")[0][0] == 0


async def test_a_change_on_one_node_reaches_the_other_at_once(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOTIFY, not polling: with polling slowed to a minute, a job queued on node A and
    cancelled on node B wakes A's waiting client within seconds."""
    monkeypatch.setattr(jobs, "POLL_SECONDS", 60.0)
    nodes: list[tuple[AnyDatabase, JobQueue]] = []
    for name in ("a", "b"):
        db = await open_database(shared_url, tmp_path / name / "unused.db")
        queue = JobQueue(
            cast(ModelManager, _NoModels()),
            db=db,
            jobs_dir=tmp_path / name / "jobs",
            workers=0,  # nothing runs: the job stays queued until it is cancelled
            max_queue=10,
        )
        await queue.start()
        nodes.append((db, queue))
    (_, a), (_, b) = nodes
    try:
        upload = tmp_path / "upload.wav"
        upload.write_bytes(b"RIFF" + bytes(3 * jobs.AUDIO_CHUNK))  # four chunks
        job = await a.submit(Job("tiny.en", TranscribeOptions(), upload, duration=1.0))
        assert not upload.exists()  # in the database now, for every node
        seen = await b.get(job.id)
        assert seen is not None and seen.state == JobState.QUEUED
        assert b.position(seen) == 1
        await b.cancel(job.id)
        finished = await asyncio.wait_for(a.wait(job), timeout=5)
        assert finished.state == JobState.CANCELLED
    finally:
        for db, queue in nodes:
            await queue.stop()
            await db.close()
    assert _query(shared_url, "SELECT count(*) FROM job_audio")[0][0] == 0


async def test_a_draining_node_leaves_queued_jobs_to_the_others(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`claim(False)` (a node draining for a rolling update): a queued job is not taken;
    `claim(True)` takes it at once, not at the next poll."""
    monkeypatch.setattr(jobs, "POLL_SECONDS", 60.0)
    db = await open_database(shared_url, tmp_path / "unused.db")
    queue = JobQueue(
        cast(ModelManager, _NoModels()),
        db=db,
        jobs_dir=tmp_path / "jobs",
        workers=1,
        max_queue=10,
    )
    await queue.start()
    try:
        queue.claim(False)
        upload = tmp_path / "upload.wav"
        upload.write_bytes(b"RIFF" + bytes(1000))
        job = await queue.submit(Job("tiny.en", TranscribeOptions(), upload, duration=1.0))
        await asyncio.sleep(2.0)
        assert _query(shared_url, "SELECT state, node FROM jobs WHERE id = %s", (job.id,)) == [
            ("queued", None)
        ]
        queue.claim(True)
        finished = await asyncio.wait_for(queue.wait(job), timeout=10)
        assert finished.state != JobState.QUEUED  # taken (no model here: it fails, but it ran)
    finally:
        await queue.stop()
        await db.close()
