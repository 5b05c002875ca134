"""The job queue survives restarts and kill -9 (issue 12, finding 9), and a database that
cannot be opened stops the start at once (finding 8).

- the durability test runs a real server with a real model: jobs finished, running and
  queued when the server is killed with SIGKILL; after a restart on the same DATA_DIR every
  accepted job finishes with the right text, no history row is lost, the database is intact;
- the recovery tests play a previous run's rows (and someone who can write the database)
  against `JobQueue.start()` directly: paths outside `DATA_DIR/jobs`, links, missing files,
  jobs the server died under too often, retention; on PostgreSQL the same rows as another
  node's, claimed when their lease expired.

On PostgreSQL (`APPLIANCE_TEST_DB=postgresql`) the rows are read from the test's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import wave
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest

from appliance.core.db import AnyDatabase, open_database
from appliance.core.engines.base import TranscribeOptions, Transcript
from appliance.core.jobs import (
    JOB_MIGRATIONS,
    MAX_ATTEMPTS,
    JobQueue,
    JobState,
    options_to_json,
)
from appliance.core.model_manager import ModelManager
from tests.conftest import (
    CLIPS,
    JFK_TEXT,
    ON_POSTGRES,
    Server,
    free_port,
    start_server,
    stop_server,
)
from tests.wer import wer

FINISHED = ("done", "failed", "cancelled")


# --- finding 8: a database that cannot be opened ------------------------------------------


def _serve(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HTTPS_ENABLED": "false",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTPS_PORT": str(free_port()),
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,  # the old code hung here until killed (TimeoutExpired fails the test)
        check=False,
    )


@pytest.mark.sqlite_only
@pytest.mark.parametrize("breakage", ["corrupt", "directory"])
def test_unusable_database_exits_promptly(tmp_path: Path, breakage: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "appliance.db"
    if breakage == "corrupt":
        db.write_bytes(b"this is not an SQLite database, just junk\n" * 200)
    else:
        db.mkdir()
    started = time.monotonic()
    result = _serve(data_dir)
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    output = result.stdout + result.stderr
    assert "cannot start" in output
    assert str(db) in output


# --- finding 9: kill -9 with jobs finished, running and queued ----------------------------


def _submit(server: Server, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        response = httpx.post(f"{server.url}/api/jobs", files={"file": (path.name, f)}, timeout=60)
    assert response.status_code == 202, response.text
    return cast(dict[str, Any], response.json())


def _job(server: Server, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return cast(dict[str, Any], response.json())


def _wait_finished(server: Server, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(server, job_id)
        if job["state"] in FINISHED:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish:\n{server.output()[-3000:]}")


def _query(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of the server's database: the SQLite file in `data_dir`, or DATABASE_URL."""
    if ON_POSTGRES:
        with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
            return list(conn.execute(sql).fetchall())
    with contextlib.closing(sqlite3.connect(data_dir / "appliance.db")) as conn:
        return list(conn.execute(sql).fetchall())


def _reference(clip: Path) -> str:
    if clip.name == "jfk.wav":
        return JFK_TEXT
    return clip.with_suffix(".txt").read_text()


def _long_clip(parts: list[Path], target: Path) -> Path:
    """The parts one after the other (about 35 s): long enough to be killed while it runs."""
    with wave.open(str(target), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        for part in parts:
            with wave.open(str(part), "rb") as f:
                out.writeframes(f.readframes(f.getnframes()))
            out.writeframes(b"\0\0" * 8000)
    target.with_suffix(".txt").write_text(" ".join(_reference(part) for part in parts))
    return target


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_jobs_survive_a_restart(tmp_path: Path, sig: signal.Signals) -> None:
    data_dir = tmp_path / "data"
    env = {"WORKER_PROCESSES": "1", "MAX_QUEUE": "10"}
    librivox = sorted((CLIPS / "librivox").glob("*.wav"))
    long = _long_clip([CLIPS / "jfk.wav", *librivox[:3]], tmp_path / "long.wav")
    clips = [librivox[1], long, librivox[0], CLIPS / "jfk.wav", librivox[3]]

    server = start_server(data_dir, env=env)
    try:
        first = _submit(server, clips[0])
        finished = _wait_finished(server, first["id"])
        assert finished["state"] == "done"
        accepted = [first] + [_submit(server, clip) for clip in clips[1:]]
        # kill while the first of them runs and the others wait behind it
        deadline = time.monotonic() + 30
        while _job(server, accepted[1]["id"])["state"] != "running":
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(0.02)
        states = [_job(server, a["id"])["state"] for a in accepted[2:]]
        os.kill(server.process.pid, sig)
        server.process.wait(timeout=20)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert states == ["queued"] * len(states)
    left = dict(_query(data_dir, "SELECT id, state FROM jobs"))
    # kill -9 leaves the row as it was; a graceful stop puts the running job back in the queue
    assert left[accepted[1]["id"]] == ("running" if sig == signal.SIGKILL else "queued")
    assert [left[a["id"]] for a in accepted[2:]] == states

    server = start_server(data_dir, env=env)
    try:
        # the job finished before the kill still answers, with its result
        before = _job(server, first["id"])
        assert before["state"] == "done"
        assert before["history_id"] == finished["history_id"]
        result = httpx.get(f"{server.url}/api/jobs/{first['id']}/result", timeout=10)
        assert result.status_code == 200
        assert result.json()["text"] == finished["text"]
        for job, clip in zip(accepted, clips, strict=True):
            final = _wait_finished(server, job["id"])
            assert final["state"] == "done", final
            # tiny.en is not perfect ("old-sposed"); a swapped or lost result would be ~1.0
            assert wer(_reference(clip), final["text"]) < 0.4, (clip.name, final["text"])
        history = httpx.get(f"{server.url}/api/history", params={"limit": 50}, timeout=10).json()
        ids = {item["id"] for item in history["items"]}
        assert finished["history_id"] in ids
        assert {_job(server, a["id"])["history_id"] for a in accepted} <= ids
        # an unknown job is still a 404 naming the retention time
        missing = httpx.get(f"{server.url}/api/jobs/{uuid.uuid4().hex}", timeout=10)
        assert missing.status_code == 404
        assert "JOB_RETENTION_HOURS" in missing.json()["error"]["message"]
    finally:
        stop_server(server)

    if not ON_POSTGRES:
        assert _query(data_dir, "PRAGMA integrity_check")[0][0] == "ok"
    rows = dict(_query(data_dir, "SELECT id, attempts FROM jobs"))
    history_rows = _query(data_dir, "SELECT count(*) FROM transcripts")[0][0]
    # killed under it once, then run again; a graceful stop does not count as an attempt
    assert rows[accepted[1]["id"]] == (2 if sig == signal.SIGKILL else 1)
    assert history_rows == len(accepted)  # every job once; the killed run left no row
    assert list((data_dir / "jobs").iterdir()) == []  # audio kept only until the job finished
    if ON_POSTGRES:  # and in the database
        assert _query(data_dir, "SELECT count(*) FROM job_audio")[0][0] == 0


# --- recovery of a previous run's rows, and rows someone forged ---------------------------


class _NoModels:
    """Recovery and pruning never touch a model."""


async def _queue(
    data_dir: Path, *, retention_hours: float = 24, workers: int = 0
) -> tuple[AnyDatabase, JobQueue]:
    db = await open_database(os.environ.get("DATABASE_URL", ""), data_dir / "appliance.db")

    async def load(history_id: str) -> Transcript | None:
        return Transcript(f"text of {history_id}", [], "en", 1.0)

    queue = JobQueue(
        cast(ModelManager, _NoModels()),
        db=db,
        jobs_dir=data_dir / "jobs",
        workers=workers,  # none: we look at what start() made of the rows
        max_queue=10,
        retention_hours=retention_hours,
        load_result=load,
    )
    return db, queue


async def _insert(db: AnyDatabase, audio_path: Path | str, **values: Any) -> str:
    await db.migrate("jobs", JOB_MIGRATIONS)
    row: dict[str, Any] = {
        "id": values.pop("id", None) or uuid.uuid4().hex,
        "state": "queued",
        "model": "tiny.en",
        "options": options_to_json(TranscribeOptions()),
        "audio_path": str(audio_path),
        "created": time.time(),
        **values,
    }
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    await db.conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))  # noqa: S608
    await db.conn.commit()
    return str(row["id"])


def _audio(jobs_dir: Path, job_id: str) -> Path:
    jobs_dir.mkdir(parents=True, exist_ok=True)
    path = jobs_dir / f"job-{job_id}"
    path.write_bytes(b"RIFF....")
    return path


@pytest.mark.sqlite_only  # on PostgreSQL the audio is in the database: no path is read
async def test_recovery_trusts_no_path_from_the_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    jobs_dir = data_dir / "jobs"
    victim = tmp_path / "victim.wav"
    victim.write_bytes(b"precious")
    db, queue = await _queue(data_dir)
    ids = {name: uuid.uuid4().hex for name in ("queued", "running", "outside", "link", "gone")}
    ids |= {"crashed": uuid.uuid4().hex, "cancelled": uuid.uuid4().hex}
    good = _audio(jobs_dir, ids["queued"])
    await _insert(db, good, id=ids["queued"], created=1.0)
    await _insert(
        db,
        _audio(jobs_dir, ids["running"]),
        id=ids["running"],
        state="running",
        attempts=1,
        created=2.0,
    )
    # a forged row pointing outside DATA_DIR/jobs, and a link planted in it
    await _insert(db, victim, id=ids["outside"])
    link = jobs_dir / f"job-{ids['link']}"
    link.symlink_to(victim)
    await _insert(db, link, id=ids["link"])
    await _insert(db, jobs_dir / f"job-{ids['gone']}", id=ids["gone"], state="running")
    crashed = _audio(jobs_dir, ids["crashed"])
    await _insert(db, crashed, id=ids["crashed"], state="running", attempts=MAX_ATTEMPTS)
    await _insert(
        db,
        _audio(jobs_dir, ids["cancelled"]),
        id=ids["cancelled"],
        state="running",
        cancel_requested=1,
    )
    orphan = jobs_dir / f"job-{uuid.uuid4().hex}"
    orphan.write_bytes(b"left by a crash between the move and the insert")
    try:
        await queue.start()
        assert [job.id for job in queue.pending] == [ids["queued"], ids["running"]]
        assert all(job.state == JobState.QUEUED for job in queue.pending)
        for name, code in (
            ("outside", "upload_missing"),
            ("link", "upload_missing"),
            ("gone", "upload_missing"),
            ("crashed", "server_crashed"),
        ):
            job = await queue.get(ids[name])
            assert job is not None
            assert job.state == JobState.FAILED, name
            assert job.error is not None and job.error["code"] == code, name
            assert "gone" in job.error["message"] or "times" in job.error["message"]
        cancelled = await queue.get(ids["cancelled"])
        assert cancelled is not None and cancelled.state == JobState.CANCELLED
        async with db.conn.execute("SELECT state FROM jobs WHERE id = ?", (ids["running"],)) as c:
            assert (await c.fetchone())[0] == "queued"
    finally:
        await queue.stop()
        await db.close()
    assert victim.read_bytes() == b"precious"  # never opened, never deleted
    assert not link.is_symlink()  # the planted link itself is gone
    assert good.exists()  # still queued: its audio stays until it finishes
    assert not crashed.exists()
    assert not orphan.exists()


async def test_finished_jobs_answer_until_the_retention_time(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db, queue = await _queue(data_dir, retention_hours=24)
    now = time.time()
    recent = await _insert(
        db,
        data_dir / "jobs" / "x",
        state="done",
        finished=now - 3600,
        history_id="h1",
        timings=json.dumps({"transcribe_seconds": 1.5}),
    )
    old = await _insert(db, data_dir / "jobs" / "y", state="failed", finished=now - 25 * 3600)
    try:
        await queue.start()
        job = await queue.get(recent)
        assert job is not None and job.state == JobState.DONE
        assert job.result is not None and job.result.text == "text of h1"
        assert job.timings == {"transcribe_seconds": 1.5}
        assert queue.snapshot(job)["text"] == "text of h1"
        assert await queue.get(old) is None
        async with db.conn.execute("SELECT count(*) FROM jobs WHERE id = ?", (old,)) as cur:
            assert (await cur.fetchone())[0] == 0  # pruned, not just hidden
        assert await queue.get("../../etc/passwd") is None
    finally:
        await queue.stop()
        await db.close()


@pytest.mark.skipif(not ON_POSTGRES, reason="leases and nodes: PostgreSQL only")
async def test_rows_of_a_dead_node_are_claimed_when_their_lease_expires(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "node-id").write_text("this-node\n")  # the node restarts on its DATA_DIR
    db, queue = await _queue(data_dir, workers=1)
    dead = {"state": "running", "node": "dead-node", "lease_until": 1.0}
    crashed = await _insert(db, "", attempts=MAX_ATTEMPTS, **dead)
    cancelled = await _insert(db, "", attempts=1, cancel_requested=1, **dead)
    gone = await _insert(db, "")  # queued, its audio deleted by hand
    alive = await _insert(
        db, "", state="running", node="busy-node", lease_until=time.time() + 3600, attempts=1
    )
    mine = await _insert(
        db, "", state="running", node="this-node", lease_until=time.time() + 3600, attempts=1
    )
    await db.conn.execute(
        "INSERT INTO job_audio (job_id, chunk, data) VALUES (?, 0, ?)", (crashed, b"RIFF")
    )
    await db.conn.commit()
    expected = {
        crashed: ("failed", "server_crashed", MAX_ATTEMPTS + 1),
        cancelled: ("cancelled", None, 2),
        gone: ("failed", "upload_missing", 1),
        mine: ("failed", "upload_missing", 2),  # taken back at once, not after its lease
    }
    try:
        await queue.start()
        deadline = time.monotonic() + 20
        while True:
            async with db.conn.execute(
                "SELECT id, state, error, attempts FROM jobs WHERE id = ANY(?)", (list(expected),)
            ) as cur:
                rows = {r[0]: r[1:] for r in await cur.fetchall()}
            found = {
                job_id: (state, json.loads(error)["code"] if error else None, attempts)
                for job_id, (state, error, attempts) in rows.items()
            }
            if found == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert found == expected
        async with db.conn.execute(
            "SELECT state, node, attempts FROM jobs WHERE id = ?", (alive,)
        ) as cur:
            assert tuple(await cur.fetchone()) == ("running", "busy-node", 1)  # its node lives
        async with db.conn.execute("SELECT count(*) FROM job_audio") as cur:
            assert (await cur.fetchone())[0] == 0
    finally:
        await queue.stop()
        await db.close()
