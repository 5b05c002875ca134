"""The Proxmox CT template built by `make image` (scripts/image/build.sh).

Two unprivileged CTs are made from it the way a Proxmox user makes them (README.md, "Use the
image": copy the tarball into the template storage, `pct create`, `pct start`, with the pct
stand-in on plain LXC). Each must serve /health over HTTPS with a certificate for its own
address that verifies against its own CA, transcribe real speech, and share no secret with the
other: admin password, secret key, CA, SSH host keys, machine-id. The tarball itself must carry
none of the build CT's secrets, and its checksum file must verify.

IMAGE_TEST_KEEP=1 leaves the CTs running after the tests (for a look inside).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.conftest import JFK_TEXT
from tests.wer import wer

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "scripts" / "pct-standin"
PCT = str(STANDIN / "pct")
VZTMPL = Path(os.environ.get("PCT_STANDIN_ROOT", "/var/lib/pct-standin")) / "template" / "cache"
GATEWAY = "10.77.77.1"
DATA_DIR = "/var/lib/whisper-appliance"
HTTPS_PORT = 5001
SSH_HOST_KEYS = ("ssh_host_ed25519_key", "ssh_host_ecdsa_key", "ssh_host_rsa_key")


@dataclass(frozen=True)
class CT:
    vmid: str
    ip: str


# VMIDs and addresses reserved for these tests (../notes: 9111-9112, .111-.112).
CTS = (CT("9111", "10.77.77.111"), CT("9112", "10.77.77.112"))


def run(
    cmd: list[str], *, timeout: float = 600, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def ct_file(ct: CT, path: str) -> bytes:
    """A file's content, read inside the running CT (pct exec)."""
    result = subprocess.run(
        [PCT, "exec", ct.vmid, "--", "cat", path], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"CT {ct.vmid}: cat {path}: {result.stderr.decode()}"
    return result.stdout


def destroy(ct: CT) -> None:
    if run([PCT, "status", ct.vmid], check=False).returncode == 0:
        run([PCT, "stop", ct.vmid], check=False)
        run([PCT, "destroy", ct.vmid])


@pytest.fixture(scope="module")
def image() -> Path:
    version_file = ROOT / "dist" / "wheelhouse" / "VERSION"
    if not version_file.is_file():
        pytest.fail("no wheelhouse: run `make dist`, then `make image`")
    version = version_file.read_text().strip()
    path = ROOT / "dist" / "image" / f"whisper-appliance-{version}-debian-12_amd64.tar.zst"
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make image`")
    return path


@pytest.fixture(scope="module")
def listing(image: Path) -> dict[str, tuple[str, int]]:
    """Every member of the tarball: name -> (numeric owner 'uid/gid', size)."""
    out = run(["tar", "--zstd", "--numeric-owner", "-tvf", str(image)]).stdout
    members: dict[str, tuple[str, int]] = {}
    for line in out.splitlines():
        perms, owner, size, _date, _time, name = line.split(maxsplit=5)
        if perms.startswith(("l", "h")):
            name = name.split(" -> ")[0].split(" link to ")[0]
        members[name.rstrip("/")] = (owner, 0 if perms.startswith("c") else int(size))
    return members


@pytest.fixture(scope="module")
def cts(image: Path) -> Iterator[tuple[CT, CT]]:
    """Both CTs, created from the image like on Proxmox, booted; destroyed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the CT image tests need root (LXC containers, bridge, NAT)")
    run([str(STANDIN / "standin-net"), "up"])
    for ct in CTS:
        destroy(ct)  # left over by an interrupted run
    # What the README tells a Proxmox user: copy the tarball into the template storage.
    VZTMPL.mkdir(parents=True, exist_ok=True)
    template = VZTMPL / image.name
    part = template.with_name(f".{image.name}.part")
    shutil.copyfile(image, part)
    part.replace(template)
    started = time.monotonic()
    try:
        for ct in CTS:
            run(
                [
                    PCT, "create", ct.vmid, f"local:vztmpl/{image.name}",
                    "--hostname", f"whisper-image-{ct.vmid}", "--cores", "2", "--memory", "2048",
                    "--swap", "512", "--unprivileged", "1", "--features", "nesting=1",
                    "--net0", f"name=eth0,bridge=vmbr0,ip={ct.ip}/24,gw={GATEWAY}",
                ]
            )  # fmt: skip
        # The second CT starts without SSH host keys, as if unpacked by a tool other than pct:
        # the image's first-boot unit must make them.
        rootfs = VZTMPL.parent.parent / "lxc" / CTS[1].vmid / "rootfs"
        for key in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
            key.unlink()
        for ct in CTS:
            run([PCT, "start", ct.vmid])
        for ct in CTS:
            wait_healthy(ct)
        print(f"2 CTs created and healthy in {time.monotonic() - started:.0f} s")
        yield CTS
    finally:
        if os.environ.get("IMAGE_TEST_KEEP") != "1":
            for ct in CTS:
                destroy(ct)
            # The template stays in the storage, as on Proxmox (the next run replaces it).
            run([str(STANDIN / "standin-net"), "down"], check=False)


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_healthy(ct: CT, timeout: float = 300) -> None:
    """Boot, first start (new CA and certificate, model load): until /health answers 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"https://{ct.ip}:{HTTPS_PORT}/health", verify=insecure())
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    journal = run([PCT, "exec", ct.vmid, "--", "journalctl", "-b", "--no-pager", "-n", "80"],
                  check=False)  # fmt: skip
    raise AssertionError(f"CT {ct.vmid}: no /health after {timeout} s ({last})\n{journal.stdout}")


def trusted(ct: CT, tmp_path: Path) -> ssl.SSLContext:
    """An SSL context that trusts only this CT's CA, fetched the way a user does (GET /ca.crt
    over plain HTTP on port 80) and checked against the file in the CT."""
    served = httpx.get(f"http://{ct.ip}/ca.crt").raise_for_status().content
    assert served.strip() == ct_file(ct, f"{DATA_DIR}/tls/ca.crt").strip()
    ca = tmp_path / f"ca-{ct.vmid}.crt"
    ca.write_bytes(served)
    return ssl.create_default_context(cafile=str(ca))


# --- the tarball ---------------------------------------------------------------------------
def test_checksum_file_verifies(image: Path) -> None:
    checksum = image.with_name(image.name + ".sha256")
    line = checksum.read_text()
    assert re.fullmatch(rf"[0-9a-f]{{64}}  {re.escape(image.name)}\n", line), line
    run(["sha256sum", "--check", "--strict", checksum.name], timeout=120, cwd=image.parent)
    assert line.split()[0] == hashlib.sha256(image.read_bytes()).hexdigest()


def test_image_carries_no_secret_of_the_build(listing: dict[str, tuple[str, int]]) -> None:
    names = set(listing)
    assert not [n for n in names if n.startswith("./etc/ssh/ssh_host_")], "SSH host keys"
    assert listing["./etc/machine-id"][1] == 0, "machine-id must be empty (first boot)"
    assert not [n for n in names if n.startswith(f".{DATA_DIR}/")], "appliance data"
    assert f".{DATA_DIR}" in names
    assert "./root/.ssh/authorized_keys" not in names, "the build's SSH key"
    assert "./etc/hostname" not in names
    assert "./var/lib/systemd/random-seed" not in names
    assert not [n for n in names if n.startswith("./var/lib/apt/lists/") and "_Packages" in n]
    assert not [n for n in names if n.startswith("./var/log/journal/")]
    assert not [n for n in names if n.startswith("./root/.ansible")]
    logs = [n for n in names if n.startswith("./var/log/") and listing[n][1] > 0]
    assert not logs, f"logs of the build: {logs}"


def test_image_carries_the_speaker_model(listing: dict[str, tuple[str, int]]) -> None:
    """Diarization works offline in every CT from the image: the model is beside the releases
    (root's), not in the data dir that the image empties."""
    owner, size = listing["./opt/whisper-appliance/models/speaker-ge2e.npz"]
    assert owner == "0/0" and size > 5_000_000


def test_image_has_the_appliance_with_root_owned_files(listing: dict[str, tuple[str, int]]) -> None:
    # A template's files belong to the CT's own ids: pct shifts them for unprivileged CTs.
    assert listing["./etc/passwd"][0] == "0/0"
    assert listing["./usr/bin/python3.11"][0] == "0/0"
    assert "./opt/whisper-appliance/current" in listing
    assert [n for n in listing if n.startswith("./opt/whisper-appliance/releases/")
            and n.endswith("/venv/bin/whisper-appliance")]  # fmt: skip
    # The bundled model is part of the release venv, not of the (empty) data dir.
    assert [n for n in listing if "/venv/lib/python3.11/site-packages/" in n
            and n.endswith("model.bin")]  # fmt: skip
    assert "./etc/systemd/system/multi-user.target.wants/whisper-appliance.service" in listing
    assert "./etc/systemd/system/multi-user.target.wants/ssh-host-keys.service" in listing
    owners = {owner for name, (owner, _) in listing.items()}
    assert all(int(i) < 65536 for owner in owners for i in owner.split("/")), owners


# --- two CTs made from it ------------------------------------------------------------------
def test_https_health_with_a_certificate_for_the_cts_own_address(
    cts: tuple[CT, CT], tmp_path: Path
) -> None:
    for ct in cts:
        context = trusted(ct, tmp_path)
        response = httpx.get(f"https://{ct.ip}:{HTTPS_PORT}/health", verify=context)
        assert response.status_code == 200
        assert response.json()
        with (
            socket.create_connection((ct.ip, HTTPS_PORT), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=ct.ip) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert ipaddress.ip_address(ct.ip) in san.value.get_values_for_type(x509.IPAddress)


def test_transcribes_real_speech(cts: tuple[CT, CT], tmp_path: Path, jfk_wav: Path) -> None:
    for ct in cts:
        with jfk_wav.open("rb") as audio:
            response = httpx.post(
                f"https://{ct.ip}:{HTTPS_PORT}/transcribe",
                files={"file": ("jfk.wav", audio, "audio/wav")},
                verify=trusted(ct, tmp_path),
                timeout=180,
            )
        assert response.status_code == 200, response.text
        text = response.json()["text"]
        assert wer(JFK_TEXT, text) < 0.15, text


def test_no_secret_is_shared(cts: tuple[CT, CT]) -> None:
    secrets: dict[str, list[bytes]] = {}
    paths = {
        "admin password": f"{DATA_DIR}/admin-password.txt",
        "app secret key": f"{DATA_DIR}/secret.key",
        "CA certificate": f"{DATA_DIR}/tls/ca.crt",
        "CA key": f"{DATA_DIR}/tls/ca.key",
        "server key": f"{DATA_DIR}/tls/server.key",
        "machine-id": "/etc/machine-id",
        **{key: f"/etc/ssh/{key}" for key in SSH_HOST_KEYS},
    }
    for what, path in paths.items():
        secrets[what] = [ct_file(ct, path) for ct in cts]
    for what, (first, second) in secrets.items():
        assert first.strip() and second.strip(), f"{what}: missing in a CT"
        assert first != second, f"{what}: the same in both CTs"
    for machine_id in secrets["machine-id"]:
        assert re.fullmatch(rb"[0-9a-f]{32}\n", machine_id), machine_id
    fingerprints = {
        x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
        for pem in secrets["CA certificate"]
    }
    assert len(fingerprints) == 2


def test_each_admin_password_opens_only_its_own_ct(cts: tuple[CT, CT], tmp_path: Path) -> None:
    passwords = [ct_file(ct, f"{DATA_DIR}/admin-password.txt").decode().strip() for ct in cts]
    for ct in cts:
        for password in passwords:
            with httpx.Client(base_url=f"https://{ct.ip}:{HTTPS_PORT}",
                              verify=trusted(ct, tmp_path)) as client:  # fmt: skip
                page = client.get("/admin/login")
                token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
                assert token, page.text[:500]
                response = client.post(
                    "/admin/api/login",
                    json={"password": password},
                    headers={"X-CSRF-Token": token.group(1)},
                )
            own = password == passwords[cts.index(ct)]
            assert response.status_code == (200 if own else 401), response.text


def unit_state(ct: CT, unit: str) -> dict[str, str]:
    out = run([PCT, "exec", ct.vmid, "--", "systemctl", "show", unit,
               "-p", "ConditionResult", "-p", "Result"]).stdout  # fmt: skip
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_first_boot_makes_ssh_host_keys_where_pct_did_not(cts: tuple[CT, CT]) -> None:
    ct = cts[1]  # started without host keys (fixture)
    state = unit_state(ct, "ssh-host-keys.service")
    assert state == {"ConditionResult": "yes", "Result": "success"}, state
    assert ct_file(ct, "/etc/ssh/ssh_host_ed25519_key.pub").startswith(b"ssh-ed25519 ")
    with socket.create_connection((ct.ip, 22), timeout=10) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-OpenSSH")
    # The first CT got its keys from pct: the unit saw them and did not run.
    assert unit_state(cts[0], "ssh-host-keys.service")["ConditionResult"] == "no"


def test_build_refuses_bad_arguments() -> None:
    """Bad input to the build gets a clear error before anything is touched."""
    build = str(ROOT / "scripts" / "image" / "build.sh")
    result = run(["bash", build, "dist/image/whisper.tar.gz"], check=False, timeout=60)
    assert result.returncode == 2
    assert "must end in .tar.zst" in result.stderr
    env = {**os.environ, "IMAGE_BUILD_VMID": "91; rm -rf /"}
    result = subprocess.run(["bash", build], capture_output=True, text=True, env=env,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "IMAGE_BUILD_VMID must be a number" in result.stderr
