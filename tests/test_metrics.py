"""Prometheus `/metrics`: the counters move when a real clip is transcribed on a real server,
the output passes `promtool check metrics` (Debian's prometheus package), the Grafana
dashboard only queries metrics that exist, and access follows API keys / METRICS_TOKEN."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.core.metrics import Metrics
from appliance.web.app import create_app
from appliance.web.metrics import wyoming_request
from appliance.web.services import Services
from tests.conftest import JFK_TEXT, Server, make_settings
from tests.wer import wer

ROOT = Path(__file__).resolve().parent.parent
# only the promtool binary of Debian's prometheus package (scripts/bootstrap.sh extracts it)
PROMTOOL = ROOT / ".cache" / "promtool" / "usr" / "bin" / "promtool"
DASHBOARD = ROOT / "deploy" / "grafana" / "whisper-appliance.json"

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for n, have, value in samples
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def promtool_check(text: str) -> None:
    if not PROMTOOL.is_file():
        pytest.fail("promtool missing: run `make setup` (scripts/bootstrap.sh)")
    result = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_move_as_a_real_clip_is_transcribed(server: Server, jfk_wav: Path) -> None:
    before = parse(scrape(server.url))
    with jfk_wav.open("rb") as f:
        response = httpx.post(
            f"{server.url}/transcribe", files={"file": (jfk_wav.name, f)}, timeout=120
        )
    assert response.status_code == 200, response.text
    assert wer(JFK_TEXT, response.json()["text"]) == 0.0
    text = scrape(server.url)
    after = parse(text)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("whisper_jobs_submitted_total") >= 1
    assert moved("whisper_jobs_started_total") >= 1
    assert moved("whisper_jobs_finished_total", outcome="done") >= 1
    assert moved("whisper_job_queue_wait_seconds_count") >= 1
    assert moved("whisper_audio_transcribed_seconds_total") == pytest.approx(11.0, abs=0.5)
    assert moved("whisper_transcribe_seconds_total") > 0
    assert moved("whisper_job_realtime_factor_count") >= 1
    assert total(after, "whisper_job_realtime_factor_sum") > 1  # faster than real time
    route = {"route": "/transcribe", "method": "POST"}
    assert moved("whisper_http_requests_total", status="200", **route) == 1
    assert moved("whisper_http_request_duration_seconds_count", **route) == 1
    assert moved("whisper_http_request_duration_seconds_sum", **route) > 0.1
    # the URL rule, never the raw path: a job id does not make a new series
    assert moved("whisper_http_requests_total", route="/metrics", status="200") == 1
    assert total(after, "whisper_jobs_running") == 0
    assert total(after, "whisper_models_loaded") >= 1
    assert total(after, "whisper_model_ram_bytes", model="tiny.en") > 10 * 1024**2
    assert total(after, "whisper_model_loads_total", model="tiny.en", outcome="ok") >= 1
    assert total(after, "process_resident_memory_bytes") > 100 * 1024**2
    assert total(after, "whisper_live_sessions") == 0
    promtool_check(text)

    # the dashboard in the repository queries only metrics this output has
    names = {name for name, _, _ in after}  # and the families without a series yet:
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names |= {name} | (
            {f"{name}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" else set()
        )
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    used = {m for expr in exprs for m in re.findall(r"\b(?:whisper|process)_[a-z_]+", expr)}
    missing = sorted(used - names)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"


def test_promtool_rejects_broken_output() -> None:
    """promtool really checks: a counter without _total is a lint problem."""
    if not PROMTOOL.is_file():
        pytest.fail("promtool missing: run `make setup` (scripts/bootstrap.sh)")
    bad = "# HELP things Things.\n# TYPE things counter\nthings 1\n"
    result = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=bad, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0


def test_each_app_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    assert one.registry is not two.registry
    one.jobs_rejected.inc()
    assert total(parse(one.render().decode()), "whisper_jobs_rejected_total") == 1
    assert total(parse(two.render().decode()), "whisper_jobs_rejected_total") == 0


def test_live_messages_feed_latency_audio_and_errors() -> None:
    m = Metrics()
    m.live_message({"type": "partial", "latency_ms": 5000})
    m.live_message({"type": "final", "latency_ms": 640.0, "text": "hello"})
    m.live_message({"type": "final", "latency_ms": None})
    m.live_message({"type": "end", "duration": 11.2})
    m.live_message({"type": "error", "code": "rate_limited", "message": "slow down"})
    samples = parse(m.render().decode())
    assert total(samples, "whisper_live_final_latency_seconds_count") == 1
    assert total(samples, "whisper_live_final_latency_seconds_sum") == pytest.approx(0.64)
    assert total(samples, "whisper_live_final_latency_seconds_bucket", le="0.75") == 1
    assert total(samples, "whisper_audio_transcribed_seconds_total", source="live") == 11.2
    assert total(samples, "whisper_errors_total", component="live", code="rate_limited") == 1


async def test_access_token_api_keys_and_networks(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        metrics_token="prom-3f9c2a7d41",
        metrics_allowed_networks=(ipaddress.ip_network("10.9.0.0/16"),),
    )
    app = create_app(settings)
    async with app.test_app():
        s: Services = app.extensions["appliance"]
        await s.warmed_up()
        client = app.test_client()

        async def status(token: str | None = None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await client.get(
                "/metrics", headers=headers, scope_base={"client": ("127.0.0.1", 40000)}
            )
            if response.status_code == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            return response.status_code

        # not a monitoring host: refused whatever it sends
        assert await status("prom-3f9c2a7d41") == 403
        networks = (ipaddress.ip_network("127.0.0.0/8"),)
        s.settings = settings.model_copy(update={"metrics_allowed_networks": networks})
        assert await status() == 401
        assert await status("wrong-token") == 401
        assert await status("prom-3f9c2a7d41") == 200
        _, key = await s.auth.create_key("prometheus")
        assert await status(key) == 200

        # no token: open like the API, until API keys are required
        s.settings = settings.model_copy(
            update={"metrics_token": "", "metrics_allowed_networks": ()}
        )
        assert await status() == 200
        s.runtime.require_api_key = True
        assert await status() == 401
        assert await status("prom-3f9c2a7d41") == 401
        assert await status(key) == 200

        # the counter the Wyoming server increments
        wyoming_request(s, "describe")
        wyoming_request(s, "transcribe", "audio_too_long")
        response = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        samples = parse((await response.get_data()).decode())
        assert total(samples, "whisper_wyoming_requests_total", kind="describe") == 1
        assert total(samples, "whisper_errors_total", component="wyoming") == 1
        refused = {"route": "/metrics", "status": "401"}
        assert total(samples, "whisper_http_requests_total", **refused) == 4


async def test_live_session_moves_the_live_metrics(server: Server, jfk_wav: Path) -> None:
    from websockets.asyncio.client import connect

    from tests.test_ws_live import CHUNK, read_pcm, start, ws_url

    before = parse(scrape(server.url))
    pcm = bytes(16000) + read_pcm(jfk_wav) + bytes(32000)
    finals = 0
    async with connect(ws_url(server)) as ws:
        await start(ws)
        for i in range(0, len(pcm), CHUNK):
            await ws.send(pcm[i : i + CHUNK])
            await asyncio.sleep(0.1)  # 2x real time: inside the 64 kB/s limit
        await ws.send(json.dumps({"type": "stop"}))
        async for raw in ws:
            finals += json.loads(raw)["type"] == "final"
    after = parse(scrape(server.url))

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert finals >= 1
    assert moved("whisper_live_sessions_started_total") == 1
    assert moved("whisper_live_final_latency_seconds_count") == finals
    assert moved("whisper_live_final_latency_seconds_sum") > 0
    audio = len(pcm) / 32000
    assert moved("whisper_audio_transcribed_seconds_total", source="live") == pytest.approx(
        audio, abs=0.5
    )
    assert total(after, "whisper_live_sessions") == 0
