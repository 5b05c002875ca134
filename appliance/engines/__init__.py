"""Inference engines behind one interface (see `base`)."""

from __future__ import annotations

from pathlib import Path

from appliance.engines.base import Engine, EngineUnavailableError


def create_engine(
    name: str,
    *,
    compute_type: str,
    cpu_threads: int,
    workers: int,
    cache_dir: Path | None = None,
) -> Engine:
    """Build the engine named by the ENGINE setting.

    `cache_dir` keeps derived model files (openai-whisper checkpoints converted from
    CTranslate2) in the data dir, which is writable under systemd's ProtectSystem.
    """
    if name == "faster-whisper":
        from appliance.engines.faster_whisper_engine import FasterWhisperEngine

        return FasterWhisperEngine(compute_type, cpu_threads, workers)
    if name == "openai-whisper":
        try:
            from appliance.engines.openai_whisper_engine import OpenAIWhisperEngine
        except ImportError as exc:  # the optional extra is not installed
            raise EngineUnavailableError(
                "ENGINE=openai-whisper needs the optional extra: "
                "pip install 'whisper-appliance[openai-whisper]'"
            ) from exc
        return OpenAIWhisperEngine(cpu_threads=cpu_threads, cache_dir=cache_dir)
    raise EngineUnavailableError(f"unknown engine {name!r}")
