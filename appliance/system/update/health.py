"""The health probe after a switch: /health must report the new version, then a test
transcription must give text (the configured clip, or a second of silence)."""

from __future__ import annotations

import io
import ipaddress
import re
import time
import wave
from typing import Any
from urllib.parse import urlsplit

import httpx

from appliance.system.update import spool as update_spool
from appliance.system.update.errors import UpdateFailed
from appliance.system.update.settings import Config


def silence_wav(seconds: float = 1.0) -> bytes:
    """A short silent 16 kHz WAV: enough to prove decoding and inference run end to end."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return buf.getvalue()


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def _client(cfg: Config) -> httpx.Client:
    host = urlsplit(cfg.url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    # our own service on loopback, with the certificate of its own CA: no MITM to fear
    return httpx.Client(verify=cfg.verify_tls and not loopback, timeout=10)


def check_service(cfg: Config, version: str) -> str:
    """Wait for /health to be green on `version`, then transcribe the test clip."""
    base = cfg.url.rstrip("/")
    deadline = time.monotonic() + cfg.health_timeout
    last = "no answer"
    with _client(cfg) as client:
        while True:
            try:
                r = client.get(f"{base}/health")
                running = _json_field(r, "version")
                if r.status_code == 200 and running == version:
                    break
                last = f"/health answered HTTP {r.status_code}, version {running}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"/health: {exc.__class__.__name__}: {exc}"
            if time.monotonic() > deadline:
                raise UpdateFailed(
                    f"not healthy on {version} after {cfg.health_timeout:.0f} s: {last}"
                )
            time.sleep(1)
        clip = cfg.clip.read_bytes() if cfg.clip else silence_wav()
        name = cfg.clip.name if cfg.clip else "silence.wav"
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        try:
            r = client.post(
                f"{base}/transcribe",
                files={"file": (name, clip, "audio/wav")},
                headers=headers,
                timeout=max(60.0, cfg.health_timeout),
            )
        except httpx.HTTPError as exc:
            raise UpdateFailed(f"test transcription: {exc.__class__.__name__}: {exc}") from None
    if r.status_code in (401, 403) and not cfg.api_key:
        return "healthy; test transcription skipped: API keys are required (UPDATER_API_KEY_FILE)"
    if r.status_code != 200:
        raise UpdateFailed(f"test transcription answered HTTP {r.status_code}: {r.text[:300]}")
    text = _json_field(r, "text")
    if not isinstance(text, str):
        raise UpdateFailed("test transcription returned no text")
    if cfg.expect and _words(cfg.expect) not in _words(text):
        raise UpdateFailed(f"test transcription gave {text[:200]!r}, expected {cfg.expect!r}")
    return f"healthy; test transcription: {text.strip()[:120]!r}"


def _json_field(response: httpx.Response, name: str) -> Any:
    try:  # the service's answer: bounded like any JSON the service user can shape
        body = update_spool.load_json(response.content, 1024 * 1024, what="the answer")
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None
