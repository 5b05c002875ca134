"""DEVICE=auto|cpu|cuda and the compute type of each device (appliance/core/engines/device.py).

The decision logic runs with stand-in GPU counts; the real CTranslate2 of this (GPU-less)
machine checks what an appliance without a GPU does: auto falls back to the CPU with one info
line, an explicit DEVICE=cuda stops the start with a clear error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from appliance.core.engines import create_engine
from appliance.core.engines.device import (
    GPU_WORKERS,
    DeviceError,
    Placement,
    cuda_device_count,
    preload_cuda_libraries,
    resolve,
)
from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine
from appliance.system.config import ConfigError, Settings
from tests.conftest import Server

CUDA = "cuda"
CPU_TYPES = {"int8", "int8_float32", "int16", "float32"}
GPU_TYPES = {"int8", "int8_float16", "int8_float32", "float16", "float32", "bfloat16"}


def _supported(device: str) -> set[str]:
    return GPU_TYPES if device == "cuda" else CPU_TYPES


def _resolve(device: str, gpus: int, **kwargs: object) -> Placement:
    options: dict[str, object] = {
        "compute_type": "int8",
        "cuda_compute_type": "float16",
        "workers": 0,
        "cpu_workers": 4,
        "count_gpus": lambda: gpus,
        "supported": _supported,
    }
    options.update(kwargs)
    return resolve(device, **options)  # type: ignore[arg-type]


def test_settings_default_to_auto_and_float16_on_gpu() -> None:
    s = Settings.from_env({})
    assert (s.device, s.compute_type, s.cuda_compute_type) == ("auto", "int8", "float16")
    s = Settings.from_env({"DEVICE": "cuda", "CUDA_COMPUTE_TYPE": "int8_float16"})
    assert (s.device, s.cuda_compute_type) == ("cuda", "int8_float16")


@pytest.mark.parametrize(("name", "value"), [("DEVICE", "gpu"), ("CUDA_COMPUTE_TYPE", "fp16")])
def test_bad_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_auto_picks_the_gpu_when_one_is_visible(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "appliance.device"):
        placement = _resolve("auto", 1)
    assert dataclasses.asdict(placement) == {
        "device": "cuda",
        "compute_type": "float16",
        "workers": GPU_WORKERS,  # not one replica per core: each holds the model in GPU memory
        "device_index": 0,
    }
    assert [r.getMessage() for r in caplog.records] == [
        f"DEVICE=auto: using CUDA GPU 0 of 1 (float16, {GPU_WORKERS} workers)"
    ]


def test_auto_without_gpu_uses_the_cpu_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "appliance.device"):
        placement = _resolve("auto", 0)
    assert (placement.device, placement.compute_type, placement.workers) == ("cpu", "int8", 4)
    assert [r.getMessage() for r in caplog.records] == [
        "DEVICE=auto: no CUDA GPU visible, using the CPU (int8)"
    ]


def test_explicit_workers_are_kept_on_the_gpu() -> None:
    assert _resolve("cuda", 2, workers=3).workers == 3
    assert _resolve("cpu", 2, workers=3).workers == 3


def test_cpu_never_looks_for_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> int:
        raise AssertionError("asked for GPUs")

    with caplog.at_level(logging.INFO, "appliance.device"):
        placement = _resolve("cpu", 0, count_gpus=boom)
    assert placement.device == "cpu"
    assert not caplog.records  # nothing to explain: the CPU was asked for


def test_explicit_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="DEVICE=cuda but CTranslate2 sees no CUDA GPU"):
        _resolve("cuda", 0)


@pytest.mark.parametrize(
    ("device", "gpus", "kwargs", "message"),
    [
        (
            "cpu",
            0,
            {"compute_type": "float16"},
            "COMPUTE_TYPE=float16 is not supported",
        ),
        ("auto", 1, {"cuda_compute_type": "int16"}, "CUDA_COMPUTE_TYPE=int16 is not supported"),
    ],
)
def test_unsupported_compute_types_stop_the_start(
    device: str, gpus: int, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(DeviceError, match=message):
        _resolve(device, gpus, **kwargs)


def test_auto_compute_type_is_left_to_ctranslate2() -> None:
    assert _resolve("cuda", 1, cuda_compute_type="auto").compute_type == "auto"


# --- the real CTranslate2 of this machine, which has no GPU -----------------------------------


def test_this_machine_has_no_gpu() -> None:
    assert cuda_device_count() == 0  # the tests below assume it


def test_real_auto_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "appliance.device"):
        engine = create_engine(
            "faster-whisper", compute_type="int8", cpu_threads=1, workers=0, device="auto"
        )
    assert isinstance(engine, FasterWhisperEngine)
    assert (engine.device, engine.compute_type) == ("cpu", "int8")
    assert engine.workers == max(1, len(os.sched_getaffinity(0)))
    assert "no CUDA GPU visible, using the CPU" in caplog.text


def test_real_explicit_cuda_is_refused() -> None:
    with pytest.raises(DeviceError, match="DEVICE=cuda"):
        create_engine(
            "faster-whisper", compute_type="int8", cpu_threads=1, workers=1, device="cuda"
        )
    with pytest.raises(DeviceError, match="ENGINE=faster-whisper"):
        create_engine(
            "openai-whisper", compute_type="int8", cpu_threads=1, workers=1, device="cuda"
        )


def test_real_cpu_refuses_float16() -> None:
    with pytest.raises(DeviceError, match="COMPUTE_TYPE=float16"):
        create_engine("faster-whisper", compute_type="float16", cpu_threads=1, workers=1)


def test_serve_with_device_cuda_exits_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "data"),
        "HTTPS_ENABLED": "false",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTPS_PORT": str(port),
        "DEVICE": "cuda",
    }
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "DEVICE=cuda but CTranslate2 sees no CUDA GPU" in done.stdout + done.stderr


def test_preload_finds_the_wheels_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The nvidia-* wheels' lib folders, loaded without LD_LIBRARY_PATH (a real shared object
    stands in for cuBLAS here; a broken file is reported, not raised)."""
    lib = tmp_path / "fakewheels" / "cublas" / "lib"
    lib.mkdir(parents=True)
    shutil.copy("/lib/x86_64-linux-gnu/libz.so.1", lib / "libcublas.so.12")
    (lib / "libcublasLt.so.12").write_bytes(b"not an ELF file")
    monkeypatch.syspath_prepend(str(tmp_path))
    wheels = (
        ("fakewheels.cublas", ("libcublasLt.so.*", "libcublas.so.*")),
        ("absent.cudnn", ("libcudnn*.so.*",)),
    )
    with caplog.at_level(logging.WARNING, "appliance.device"):
        loaded = preload_cuda_libraries(wheels)
    assert loaded == [str(lib / "libcublas.so.12")]
    assert "could not load the CUDA library" in caplog.text
    assert preload_cuda_libraries() == []  # this machine has no nvidia-* wheels


# --- the GPU image and compose service (not built here: no GPU, and ~1.3 GB of CUDA wheels) ---

ROOT = Path(__file__).resolve().parent.parent


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    steps = []
    for step in text.replace("\\\n", " ").splitlines():
        if step.strip():
            word, _, rest = step.strip().partition(" ")
            steps.append((word.upper(), " ".join(rest.split())))
    return steps


def test_gpu_dockerfile_extends_the_cpu_image() -> None:
    steps = _instructions(ROOT / "Dockerfile.gpu")
    words = [word for word, _ in steps]
    assert set(words) <= {"ARG", "FROM", "USER", "COPY", "RUN", "ENV"}
    assert steps[0] == ("ARG", "IMAGE=localhost/whisper-appliance:latest")
    assert steps[1] == ("FROM", "${IMAGE}")
    assert steps[-1] == ("USER", "whisper")  # the service never runs as root
    run = next(args for word, args in steps if word == "RUN")
    assert 'pip" install -r /opt/whisper-appliance/requirements-gpu.lock' in run
    assert 'pip" uninstall -y pip' in run  # as in the CPU image
    env = next(args for word, args in steps if word == "ENV")
    site = "/opt/whisper-appliance/venv/lib/python3.11/site-packages"
    assert f"LD_LIBRARY_PATH={site}/nvidia/cublas/lib:{site}/nvidia/cudnn/lib" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    # the CPU image stays without CUDA, and the GPU list reaches the build context
    assert "nvidia" not in (ROOT / "Dockerfile").read_text().lower()
    assert "!requirements-gpu.lock" in (ROOT / ".dockerignore").read_text().splitlines()
    pins = [  # the pin lines; their hashes follow on continuation lines (tests/test_locks.py)
        line.split()[0] for line in (ROOT / "requirements-gpu.lock").read_text().splitlines()
        if re.match(r"[a-z0-9-]+==", line)
    ]  # fmt: skip
    names = [p.split("==")[0] for p in pins]
    assert names == ["nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-cuda-nvrtc-cu12"]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", p) for p in pins)
    assert pins[1].split("==")[1].startswith("9.")  # CTranslate2 4.5+ needs cuDNN 9


def test_compose_gpu_service() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    cpu = compose["services"]["whisper-appliance"]
    gpu = compose["services"]["whisper-appliance-gpu"]
    assert gpu["profiles"] == ["gpu"]  # `docker compose up` alone still starts the CPU service
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert gpu["build"]["args"]["IMAGE"] == cpu["image"]  # built on the CPU image
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    for key in ("ports", "volumes", "read_only", "tmpfs", "cap_drop", "security_opt"):
        assert gpu[key] == cpu[key], key  # the same hardening and data as the CPU service
    known = {row[0] for row in Settings.documentation()}
    assert set(gpu["environment"]) <= known
    settings = Settings.from_env({k: str(v) for k, v in gpu["environment"].items()})
    assert (settings.device, settings.cuda_compute_type) == ("cuda", "float16")


def test_status_reports_the_device_in_use(server: Server) -> None:
    status = httpx.get(f"{server.url}/api/status", timeout=30).json()
    assert (status["device"], status["compute_type"]) == ("cpu", "int8")  # DEVICE=auto, no GPU
    assert "DEVICE=auto: no CUDA GPU visible, using the CPU (int8)" in server.output()
