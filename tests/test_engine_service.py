"""ENGINE=openai-whisper behind the real service gives the same transcript as the default."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

pytest.importorskip("torch")
pytest.importorskip("whisper")


@pytest.mark.openai_whisper
@pytest.mark.slow
def test_openai_whisper_service_matches_faster_whisper(
    tmp_path: Path, server: Server, jfk_wav: Path
) -> None:
    reference = httpx.post(
        f"{server.url}/transcribe", files={"file": jfk_wav.read_bytes()}, timeout=120
    ).json()
    srv = start_server(tmp_path / "data", env={"ENGINE": "openai-whisper"}, timeout=180)
    try:
        status = httpx.get(f"{srv.url}/api/status", timeout=10).json()
        assert status["engine"] == "openai-whisper"
        result = httpx.post(
            f"{srv.url}/transcribe", files={"file": jfk_wav.read_bytes()}, timeout=300
        ).json()
        assert result["text"] == reference["text"]
        # The converted checkpoint lives in the data dir (writable under systemd), not in $HOME.
        assert list((srv.data_dir / "cache").rglob("*.pt"))
    finally:
        stop_server(srv)
