"""Where faster-whisper runs (DEVICE) and with which CTranslate2 compute type.

`DEVICE=auto` (the default) runs on the first CUDA GPU when CTranslate2 sees one
(`ctranslate2.get_cuda_device_count() > 0`) and on the CPU otherwise, with one info line saying
which and why. `DEVICE=cuda` with no visible GPU refuses to start with a clear error (a GPU was
asked for: silently running 20x slower on the CPU would hide a broken passthrough);
`DEVICE=cpu` never looks for a GPU.

The compute type is set per device: `COMPUTE_TYPE` (int8) on the CPU, `CUDA_COMPUTE_TYPE`
(float16) on a GPU, each checked against `ctranslate2.get_supported_compute_types(device)` so a
type the hardware cannot run stops the start instead of failing at the first model load.

CUDA libraries: CTranslate2 dlopens cuBLAS 12 and cuDNN 9 by soname. Installed as PyPI wheels
(`nvidia-cublas-cu12`, `nvidia-cudnn-cu12`: requirements-gpu.lock) they sit in the venv's
`nvidia/*/lib`, off the loader path; `preload_cuda_libraries` loads them first (RTLD_GLOBAL), so
no LD_LIBRARY_PATH is needed (the GPU image sets it anyway).

Workers on a GPU: each CTranslate2 worker holds its own copy of the model in GPU memory, so
"one worker per CPU core" (`WORKER_PROCESSES=0`) becomes `GPU_WORKERS` replicas on the GPU
(two: one decodes while the other's host-side work runs); an explicit WORKER_PROCESSES is kept.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.exceptions import ConfigError

log = logging.getLogger("appliance.device")

DEVICES = ("auto", "cpu", "cuda")  # the values DEVICE accepts
GPU_WORKERS = 2  # model replicas on the GPU when WORKER_PROCESSES=0 (auto)


class DeviceError(ConfigError):
    """The requested device or compute type cannot be used on this machine."""


@dataclass(frozen=True)
class Placement:
    """Where the model runs: device, compute type and CTranslate2 workers (replicas)."""

    device: str  # "cpu" or "cuda"
    compute_type: str
    workers: int
    device_index: int = 0


def cuda_device_count() -> int:
    """GPUs CTranslate2 can use; 0 when it was built without CUDA or no driver is loaded."""
    try:
        import ctranslate2
    except ImportError:  # pragma: no cover - faster-whisper depends on it
        return 0
    try:
        return int(ctranslate2.get_cuda_device_count())
    except RuntimeError:  # a CUDA runtime with a driver too old or absent
        return 0


def supported_compute_types(device: str) -> set[str]:
    """Compute types CTranslate2 runs efficiently on `device` (empty if it cannot ask)."""
    import ctranslate2

    try:
        return set(ctranslate2.get_supported_compute_types(device))
    except (RuntimeError, ValueError):
        return set()


def resolve(
    device: str,
    *,
    compute_type: str,
    cuda_compute_type: str,
    workers: int,
    cpu_workers: int,
    count_gpus: Callable[[], int] = cuda_device_count,
    supported: Callable[[str], set[str]] = supported_compute_types,
) -> Placement:
    """Pick the device and its compute type; DeviceError if the request cannot be met.

    `workers` is WORKER_PROCESSES (0 = auto); `cpu_workers` is what auto means on the CPU
    (one per core).
    """
    if device not in DEVICES:
        raise DeviceError(f"DEVICE: expected one of {', '.join(DEVICES)}, got {device!r}")
    gpus = 0 if device == "cpu" else count_gpus()
    if device == "cuda" and gpus == 0:
        raise DeviceError(
            "DEVICE=cuda but CTranslate2 sees no CUDA GPU (check nvidia-smi in the container, "
            "the device nodes and driver libraries passed through, CUDA_VISIBLE_DEVICES); "
            "set DEVICE=auto to fall back to the CPU"
        )
    if gpus > 0:
        chosen, wanted, setting = "cuda", cuda_compute_type, "CUDA_COMPUTE_TYPE"
        count = workers or GPU_WORKERS
    else:
        chosen, wanted, setting = "cpu", compute_type, "COMPUTE_TYPE"
        count = workers or cpu_workers
    types = supported(chosen)
    if wanted != "auto" and types and wanted not in types:
        raise DeviceError(
            f"{setting}={wanted} is not supported on this {chosen.upper()} "
            f"(supported: {', '.join(sorted(types))})"
        )
    if device == "auto":
        if chosen == "cuda":
            log.info("DEVICE=auto: using CUDA GPU 0 of %d (%s, %d workers)", gpus, wanted, count)
        else:
            log.info("DEVICE=auto: no CUDA GPU visible, using the CPU (%s)", wanted)
    return Placement(chosen, wanted, max(1, count))


CUDA_WHEELS = (
    ("nvidia.cublas", ("libcublasLt.so.*", "libcublas.so.*")),
    ("nvidia.cudnn", ("libcudnn*.so.*",)),
)


def preload_cuda_libraries(
    wheels: tuple[tuple[str, tuple[str, ...]], ...] = CUDA_WHEELS,
) -> list[str]:
    """Load the CUDA libraries of the nvidia-* wheels globally; return the files loaded.

    Libraries that need one not loaded yet are tried again after the others (cuDNN's parts
    depend on each other); what cannot be loaded at all is left to CTranslate2's own error.
    """
    files: list[Path] = []
    for package, patterns in wheels:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:  # no `nvidia` namespace package at all
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            files += sorted(f for pattern in patterns for f in (Path(root) / "lib").glob(pattern))
    loaded: list[str] = []
    pending = files
    while pending:
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(path)
            else:
                loaded.append(str(path))
        if len(failed) == len(pending):
            for path in failed:
                log.warning("could not load the CUDA library %s", path)
            break
        pending = failed
    return loaded
