"""Token buckets: parsing, refill, and 429 + Retry-After on the transcription endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.app import create_app
from appliance.config import ConfigError, Settings
from appliance.ratelimit import Rate, RateLimiter, parse_rate
from tests.conftest import make_settings as make_settings
from tests.test_auth import admin_password, login


def test_parse_rate() -> None:
    assert parse_rate("120/minute") == Rate(120, 60.0)
    assert parse_rate("5/min") == Rate(5, 60.0)
    assert parse_rate("2 / s") == Rate(2, 1.0)
    assert parse_rate("1000/hours") == Rate(1000, 3600.0)
    assert parse_rate("0").unlimited
    assert str(parse_rate("10/m")) == "10/minute"
    for bad in ("", "fast", "10/fortnight", "-1/min", "10", "1e3/min"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ConfigError, match="API_RATE_LIMIT"):
        Settings.from_env({"API_RATE_LIMIT": "lots"})


def test_token_bucket_refills() -> None:
    limiter = RateLimiter(Rate(3, 60.0))
    assert [limiter.hit("a", now=0.0) for _ in range(3)] == [None, None, None]
    assert limiter.hit("a", now=0.0) == 20  # one token per 20 s
    assert limiter.hit("b", now=0.0) is None  # other clients have their own bucket
    assert limiter.hit("a", now=10.0) == 10
    assert limiter.hit("a", now=20.0) is None
    assert RateLimiter(Rate(0, 1.0)).hit("a") is None


def test_forgets_the_oldest_buckets() -> None:
    limiter = RateLimiter(Rate(1, 60.0), max_keys=2)
    for key in ("a", "b", "c"):
        limiter.hit(key, now=0.0)
    assert limiter.hit("a", now=0.0) is None  # "a" was forgotten (a full bucket again)
    assert limiter.hit("c", now=0.0) == 60


async def test_transcription_requests_get_429_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", api_rate_limit=Rate(2, 60.0))
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        codes = [(await client.post("/transcribe")).status_code for _ in range(2)]
        assert codes == [415, 415]  # refused uploads still cost a token
        limited = await client.post("/v1/audio/transcriptions")
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 30
        assert (await limited.get_json())["error"]["code"] == "rate_limited"
        # reading costs nothing
        assert (await client.get("/api/models")).status_code == 200
        # an API key has its own bucket
        csrf = await login(client, admin_password(settings))
        created = await client.post(
            "/admin/api/keys", json={"name": "bucket"}, headers={"X-CSRF-Token": csrf}
        )
        key = (await created.get_json())["key"]
        keyed = app.test_client()
        response = await keyed.post("/transcribe", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 415
