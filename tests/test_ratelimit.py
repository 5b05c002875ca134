"""Token buckets: parsing, refill, and 429 + Retry-After on the transcription endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.ratelimit import Rate, RateLimiter, parse_rate
from appliance.system.config import ConfigError, Settings
from appliance.web.app import create_app
from appliance.web.security import forwarded_client
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


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("10.0.0.2", ["203.0.113.7"], "203.0.113.7"),  # one trusted proxy
        ("10.0.0.2", ["198.51.100.1, 203.0.113.7, 10.0.0.3"], "203.0.113.7"),  # two proxies
        ("10.0.0.2", ["forged-by-client, 203.0.113.7"], "203.0.113.7"),  # left of it: ignored
        ("10.0.0.2", ["not-an-ip"], "10.0.0.2"),  # garbage: the proxy itself
        ("10.0.0.2", [], "10.0.0.2"),  # no header
        ("10.0.0.2", ["10.0.0.3"], "10.0.0.3"),  # only proxies: the leftmost one
        ("192.0.2.9", ["203.0.113.7"], "192.0.2.9"),  # an untrusted peer's header is ignored
        ("10.0.0.2", ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_forwarded_client(peer: str, header: list[str], expected: str) -> None:
    proxies = Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/24"}).trusted_proxies
    assert forwarded_client(peer, header, proxies) == expected


@pytest.mark.parametrize("value", ["10.0.0.300", "proxy.example", "10.0.0.0/33", "; rm -rf /"])
def test_trusted_proxies_rejects_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        Settings.from_env({"TRUSTED_PROXIES": value})


async def test_buckets_per_forwarded_client_only_behind_a_trusted_proxy(tmp_path: Path) -> None:
    """Behind a reverse proxy every request comes from the proxy: with TRUSTED_PROXIES each
    client gets its own bucket; without it X-Forwarded-For is ignored (it could be forged)."""
    for trusted, second_client_code in (("127.0.0.1", 415), ("", 429)):
        settings = make_settings(
            tmp_path / f"data{bool(trusted)}",
            api_rate_limit=Rate(1, 60.0),
            trusted_proxies=Settings.from_env({"TRUSTED_PROXIES": trusted}).trusted_proxies,
        )
        app = create_app(settings)
        async with app.test_app():
            client = app.test_client()
            codes = []
            for forwarded in ("203.0.113.7", "203.0.113.7", "203.0.113.8"):
                response = await client.post(
                    "/transcribe",
                    headers={"X-Forwarded-For": forwarded},
                    # the proxy's address (the test client has none of its own)
                    scope_base={"client": ("127.0.0.1", 50000)},
                )
                codes.append(response.status_code)
            assert codes == [415, 429, second_client_code]
