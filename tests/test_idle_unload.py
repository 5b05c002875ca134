"""MODEL_IDLE_TIMEOUT: an unused model (the default one included) is unloaded, the next request
loads it again and transcribes right; a model in use (a running job, a live session) is never
unloaded under it. Real app, real engine, real speech, a one-second timeout."""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.system.config import ConfigError, Settings
from appliance.web.app import create_app
from appliance.web.services import Services
from tests.conftest import JFK_TEXT, make_settings
from tests.wer import wer

TIMEOUT = 1  # MODEL_IDLE_TIMEOUT of these tests, seconds


@pytest.fixture
async def idle_app(tmp_path: Path) -> AsyncIterator[Quart]:
    app = create_app(make_settings(tmp_path / "data", model_idle_timeout=TIMEOUT))
    async with app.test_app():
        await app.extensions["appliance"].warmed_up()
        yield app


def services(app: Quart) -> Services:
    result: Services = app.extensions["appliance"]
    return result


async def wait_unloaded(s: Services, name: str, within: float) -> float:
    """Seconds until `name` left the loaded models; fails after `within`."""
    started = time.monotonic()
    while name in s.models.loaded:
        assert time.monotonic() - started < within, f"{name} still loaded after {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def repeated_wav(source: Path, times: int) -> bytes:
    """The clip `times` over, as one WAV: a job that runs for several idle timeouts."""
    with wave.open(str(source), "rb") as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setparams(params)
        w.writeframes(frames * times)
    return out.getvalue()


def test_setting_is_validated() -> None:
    assert Settings.from_env({}).model_idle_timeout == 3600
    assert Settings.from_env({"MODEL_IDLE_TIMEOUT": "0"}).model_idle_timeout == 0
    with pytest.raises(ConfigError, match="MODEL_IDLE_TIMEOUT"):
        Settings.from_env({"MODEL_IDLE_TIMEOUT": "-5"})
    with pytest.raises(ConfigError, match="MODEL_IDLE_TIMEOUT"):
        Settings.from_env({"MODEL_IDLE_TIMEOUT": "soon"})


async def test_idle_default_model_is_unloaded_and_reloaded(idle_app: Quart, jfk_wav: Path) -> None:
    s = services(idle_app)
    client = idle_app.test_client()
    assert "tiny.en" in s.models.loaded  # warmed up at start
    waited = await wait_unloaded(s, "tiny.en", within=TIMEOUT + 5)
    assert waited <= TIMEOUT + 1
    assert s.models.loaded == {}
    assert s.models.idle_unloaded == {"tiny.en"}
    # still healthy: the model comes back on the next request
    health = await client.get("/health")
    assert health.status_code == 200, await health.get_data()
    metrics = (await (await client.get("/metrics")).get_data()).decode()
    assert 'whisper_model_unloads_total{model="tiny.en",reason="idle"} 1.0' in metrics
    assert "whisper_models_loaded 0.0" in metrics

    upload = FileStorage(io.BytesIO(jfk_wav.read_bytes()), filename="jfk.wav")
    response = await client.post("/transcribe", files={"file": upload})
    assert response.status_code == 200, await response.get_data()
    assert wer(JFK_TEXT, (await response.get_json())["text"]) == 0.0
    assert "tiny.en" in s.models.loaded
    assert s.models.idle_unloaded == set()
    metrics = (await (await client.get("/metrics")).get_data()).decode()
    assert 'whisper_model_loads_total{model="tiny.en",outcome="ok"} 2.0' in metrics
    # and unloaded again once that request is TIMEOUT behind us
    await wait_unloaded(s, "tiny.en", within=TIMEOUT + 5)


async def test_model_in_use_is_never_unloaded(idle_app: Quart, jfk_wav: Path) -> None:
    s = services(idle_app)
    client = idle_app.test_client()

    # held as a live session holds it: three timeouts later it is still there
    async with s.models.use("tiny.en"):
        await asyncio.sleep(3 * TIMEOUT)
        assert "tiny.en" in s.models.loaded
        assert s.models.loaded["tiny.en"].users == 1
    await wait_unloaded(s, "tiny.en", within=TIMEOUT + 5)

    # a real job longer than the timeout: loaded from its start to its end
    upload = FileStorage(io.BytesIO(repeated_wav(jfk_wav, 3)), filename="jfk3.wav")
    response = await client.post("/api/jobs", files={"file": upload})
    assert response.status_code == 202, await response.get_data()
    job = s.jobs.jobs[(await response.get_json())["id"]]
    held_since: float | None = None  # from when the job's model is loaded (it may load it first)
    while not job.state.finished:
        if job.state == "running" and "tiny.en" in s.models.loaded:
            held_since = held_since or time.monotonic()
        elif held_since is not None and not job.state.finished:
            raise AssertionError("the model was unloaded under a running job")
        await asyncio.sleep(0.02)
    assert job.state == "done", job.error
    assert held_since is not None
    assert time.monotonic() - held_since > 1.5 * TIMEOUT  # the job outlived the timeout
    assert job.result is not None
    assert wer(" ".join([JFK_TEXT] * 3), job.result.text) < 0.15
    await wait_unloaded(s, "tiny.en", within=TIMEOUT + 5)


async def test_zero_never_unloads(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", model_idle_timeout=0))
    async with app.test_app():
        s = services(app)
        await s.warmed_up()
        await asyncio.sleep(1.5)
        assert "tiny.en" in s.models.loaded
        assert s.models._idle_timers == {}
