"""Inference engines behind one interface (see `base`)."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.core.engines.base import Engine, EngineUnavailableError
from appliance.core.engines.device import DeviceError


def create_engine(
    name: str,
    *,
    compute_type: str,
    cpu_threads: int,
    workers: int,
    cache_dir: Path | None = None,
    device: str = "cpu",
    cuda_compute_type: str = "float16",
) -> Engine:
    """Build the engine named by the ENGINE setting.

    `workers` is WORKER_PROCESSES: 0 means one per core on the CPU and
    `device.GPU_WORKERS` model replicas on a GPU. `device` (DEVICE: auto, cpu, cuda) and the
    compute type of each device are resolved here (`appliance.core.engines.device`); a GPU that was
    asked for and is not there raises DeviceError (a ConfigError: the start stops).
    `cache_dir` keeps derived model files (openai-whisper checkpoints converted from
    CTranslate2) in the data dir, which is writable under systemd's ProtectSystem.
    """
    cpu_workers = max(1, len(os.sched_getaffinity(0)))
    if name == "faster-whisper":
        from appliance.core.engines.device import preload_cuda_libraries, resolve
        from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine

        placement = resolve(
            device,
            compute_type=compute_type,
            cuda_compute_type=cuda_compute_type,
            workers=workers,
            cpu_workers=cpu_workers,
        )
        if placement.device == "cuda":
            preload_cuda_libraries()
        return FasterWhisperEngine(
            placement.compute_type,
            cpu_threads,
            placement.workers,
            device=placement.device,
            device_index=placement.device_index,
        )
    if name == "openai-whisper":
        if device == "cuda":
            raise DeviceError(
                "DEVICE=cuda needs ENGINE=faster-whisper (openai-whisper runs on CPU)"
            )
        try:
            from appliance.core.engines.openai_whisper_engine import OpenAIWhisperEngine
        except ImportError as exc:  # the optional extra is not installed
            raise EngineUnavailableError(
                "ENGINE=openai-whisper needs the optional extra: "
                "pip install 'whisper-appliance[openai-whisper]'"
            ) from exc
        return OpenAIWhisperEngine(cpu_threads=cpu_threads, cache_dir=cache_dir)
    raise EngineUnavailableError(f"unknown engine {name!r}")
