"""The Docker image, built from the Dockerfile with podman and run the way compose.yaml runs it
(read-only root, no capabilities, a volume for /data): health, a real transcription of JFK,
offline diarization with the packaged speaker model, a non-root service and a passing
HEALTHCHECK.

WA_WHEELHOUSE overrides dist/wheelhouse; WA_IMAGE_BASE picks the base image (`make
test-container` passes the local Debian base it builds from Debian's archive; Docker Hub's
python:3.11-slim-bookworm works where reachable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
PODMAN = os.environ.get("PODMAN", "podman")
RUNTIME = os.environ.get("PODMAN_RUNTIME", "runc")
BASE = os.environ.get("WA_IMAGE_BASE", "localhost/wa-base:bookworm")
IMAGE = "localhost/whisper-appliance:test"
JFK_WORDS = "ask not what your country can do for you"
# This machine: podman's default nofile/nproc limits exceed what its runc may set here (no
# CAP_SYS_RESOURCE), and without systemd there are no healthcheck timers (the test runs the
# check by hand with `podman healthcheck run`). Neither changes what the image does.
HOST_QUIRKS = os.environ.get(
    "PODMAN_RUN_ARGS",
    "--ulimit nofile=16384:16384 --ulimit nproc=8192:8192 --health-interval disable",
).split()


def podman(
    *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which(PODMAN) is None:
        pytest.fail("podman is missing: apt-get install podman runc")
    wheelhouse = Path(os.environ.get("WA_WHEELHOUSE", ROOT / "dist" / "wheelhouse"))
    if not (wheelhouse / "VERSION").is_file():
        pytest.fail("no wheelhouse: run `make dist`")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.fail(f"base image {BASE} missing: run `make image-docker-base`")
    # A private build context of hard links: a concurrent `make dist` cannot change it under us.
    context = tmp_path_factory.mktemp("context")
    shutil.copytree(wheelhouse, context / "dist" / "wheelhouse", copy_function=os.link)
    shutil.copy(ROOT / ".dockerignore", context)
    started = time.monotonic()
    podman(
        "build", "--runtime", RUNTIME, "--format", "docker", "--pull=never",
        "--build-arg", f"BASE={BASE}", "-t", IMAGE, "-f", str(ROOT / "Dockerfile"), str(context),
    )  # fmt: skip
    print(f"image built in {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, str]]:
    """The image running as compose.yaml runs it, plain HTTP on a free loopback port."""
    name = f"wa-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        podman(
            "run", "--runtime", RUNTIME, "-d", "--name", name,
            "-p", f"127.0.0.1:{port}:5001", "-v", f"{volume}:/data",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "-e", "HTTPS_ENABLED=false",
            *HOST_QUIRKS,
            image,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman("logs", name, check=False)
                raise AssertionError(f"container {state}, not healthy:\n{logs.stderr[-4000:]}")
            time.sleep(1)
        yield name, url
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)


def test_transcribes_a_real_clip(container: tuple[str, str], jfk_wav: Path) -> None:
    _, url = container
    with jfk_wav.open("rb") as f:
        r = httpx.post(
            f"{url}/transcribe", files={"file": ("jfk.wav", f, "audio/wav")}, timeout=180
        )
    assert r.status_code == 200, r.text
    assert JFK_WORDS in r.json()["text"].lower().replace(",", "")


def test_diarizes_offline_with_the_packaged_model(container: tuple[str, str]) -> None:
    """The speaker model ships in the image (/opt/whisper-appliance/models, from the
    wheelhouse): with an empty /data volume and no network, diarize=true labels two speakers."""
    name, url = container
    assert "speaker-ge2e.npz" in podman("exec", name, "ls", "/opt/whisper-appliance/models").stdout
    assert "speaker-ge2e.npz" not in podman("exec", name, "ls", "-R", "/data").stdout
    clip = ROOT / ".cache" / "clips" / "diarization" / "sample.wav"
    with clip.open("rb") as f:
        r = httpx.post(
            f"{url}/transcribe",
            files={"file": ("sample.wav", f, "audio/wav")},
            data={"diarize": "true", "num_speakers": "2"},
            timeout=300,
        )
    assert r.status_code == 200, r.text
    assert {s["speaker"] for s in r.json()["segments"]} == {"Speaker 1", "Speaker 2"}


def test_runs_as_a_non_root_user(container: tuple[str, str]) -> None:
    name, _ = container
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids and all(uid != "0" for uid in uids), status
    assert podman("exec", name, "id", "-un").stdout.strip() == "whisper"


def test_healthcheck_passes(container: tuple[str, str]) -> None:
    name, _ = container
    result = podman("healthcheck", "run", name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    config = podman("inspect", "-f", "{{json .Config.Healthcheck}}", name).stdout
    assert "/health" in config


def test_data_lives_in_the_volume(container: tuple[str, str]) -> None:
    name, _ = container
    listing = podman("exec", name, "ls", "/data").stdout.split()
    assert "appliance.db" in listing


def test_compose_file_matches_what_is_tested() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = compose["services"]["whisper-appliance"]
    assert service["ports"] == ["5001:5001"]
    assert any(v.endswith(":/data") for v in service["volumes"])
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["build"]["args"]["BASE"] == "docker.io/library/python:3.11-slim-bookworm"


def test_healthcheck_follows_https_by_default(image: str) -> None:
    """With the defaults (HTTPS, the appliance's own CA) the probe still gets a green /health."""
    name = f"wa-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        podman(
            "run", "--runtime", RUNTIME, "-d", "--name", name, "-p", f"127.0.0.1:{port}:5001",
            "--read-only", "--tmpfs", "/tmp", "-v", f"{name}-data:/data",
            *HOST_QUIRKS, image,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while podman("healthcheck", "run", name, check=False).returncode != 0:
            state = podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman("logs", name, check=False)
                raise AssertionError(f"container {state}, not healthy:\n{logs.stderr[-4000:]}")
            time.sleep(2)
        r = httpx.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=5)  # noqa: S501
        assert r.status_code == 200
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)
        podman("volume", "rm", "-f", f"{name}-data", check=False)
