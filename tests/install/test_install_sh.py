"""install.sh end to end, unattended, on the pct stand-in (Proxmox's pct, pveam, pvesm, pvesh and
pveversion on plain LXC) as root, the way a Proxmox user runs it.

The release installer (dist/install.sh, pinned by `make installer` to the CT template of
`make image`) downloads the template from a local HTTP server standing in for the release page,
verifies it, creates the CT, waits for health and prints URL, password command and CA link; the
test follows the three: the CA from the link verifies the HTTPS certificate of the URL. A re-run
finds the CT by its host name and tag, starts it, and creates nothing. A wrong checksum, a
template that never gets healthy, an interrupted run, bad settings (also typed into the whiptail
dialogs), a foreign CT, no root and no Proxmox are refused or rolled back, and leave no CT and no
file behind.

The stand-in keeps its state in its own root (STANDIN_ROOT), so molecule's CTs are never seen.
CTIDs 9120-9125 and 10.77.77.120-.125 are reserved for these tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import re
import select
import shutil
import signal
import ssl
import struct
import subprocess
import termios
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve_directory

pytestmark = [pytest.mark.install, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "scripts" / "pct-standin"
STANDIN_ROOT = Path("/var/lib/pct-standin-install")
VZTMPL = STANDIN_ROOT / "template" / "cache"
INSTALL_SH = ROOT / "install.sh"
RELEASE_SH = ROOT / "dist" / "install.sh"
BASE = ROOT / ".cache" / "lxc" / "debian-12-standard_12.0-standin_amd64.tar.zst"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = ROOT / "dist" / "image" / f"whisper-appliance-{VERSION}-debian-12_amd64.tar.zst"
PASSWORD_FILE = "/var/lib/whisper-appliance/admin-password.txt"
CTIDS = range(9120, 9126)
GATEWAY = "10.77.77.1"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lab_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("var_")}
    env.update(PATH=f"{STANDIN}:{env['PATH']}", PCT_STANDIN_ROOT=str(STANDIN_ROOT), **extra)
    return env


def settings_env(settings: dict[str, str]) -> dict[str, str]:
    return lab_env(**{f"var_{k}": v for k, v in settings.items()})


def pct(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        [str(STANDIN / "pct"), *args], env=lab_env(), capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        pytest.fail(f"pct {' '.join(args)}: {result.stderr}")
    return result.stdout


def ct_ids() -> set[int]:
    return {int(p.stem) for p in (STANDIN_ROOT / "pve" / "lxc").glob("*.conf")}


def templates() -> list[str]:
    return sorted(p.name for p in VZTMPL.iterdir()) if VZTMPL.is_dir() else []


def destroy(ctid: int) -> None:
    if (STANDIN_ROOT / "pve" / "lxc" / f"{ctid}.conf").exists():
        pct("stop", str(ctid), check=False)
        pct("destroy", str(ctid))


@dataclass
class Run:
    rc: int
    out: str  # stdout and stderr, as the user sees them

    def summary(self) -> dict[str, str]:
        lines = dict(
            re.findall(r"^ {3}(URL|Admin password|CA certificate): +(\S.*?)$", self.out, re.M)
        )
        assert set(lines) == {"URL", "Admin password", "CA certificate"}, self.out
        lines["CA certificate"] = lines["CA certificate"].split()[0]
        return lines


def install(
    script: Path = INSTALL_SH,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    **settings: str,
) -> Run:
    """Runs an installer like `var_x=... bash install.sh --unattended`, stdin not a terminal."""
    result = subprocess.run(
        ["bash", str(script), *args],
        env=env or settings_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(result.returncode, result.stdout)


def base_settings(ctid: int, /, **more: str) -> dict[str, str]:
    """Valid settings with the plain Debian template (never healthy: no appliance in it)."""
    return {
        "ctid": str(ctid),
        "hostname": f"wa-install-{ctid}",
        "net": f"10.77.77.{ctid - 9000}/24",
        "gateway": GATEWAY,
        "image": str(BASE),
        "image_sha256": sha256(BASE),
        "health_timeout": "20",
        **more,
    }


@pytest.fixture(scope="module", autouse=True)
def lab() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("install.sh tests need root (LXC containers, bridge, NAT): make test-install")
    for ids in (Path("/etc/subuid"), Path("/etc/subgid")):  # unprivileged CTs, as on Proxmox
        if "root:100000:65536" not in (ids.read_text().split() if ids.exists() else []):
            with ids.open("a") as f:
                f.write("root:100000:65536\n")
    subprocess.run([str(STANDIN / "build-template"), str(BASE)], check=True, timeout=900)
    subprocess.run([str(STANDIN / "standin-net"), "up"], check=True, timeout=60)
    for ctid in CTIDS:
        destroy(ctid)
    shutil.rmtree(VZTMPL, ignore_errors=True)
    try:
        yield
    finally:
        for ctid in CTIDS:
            destroy(ctid)
        shutil.rmtree(STANDIN_ROOT, ignore_errors=True)
        # The bridge stays up: molecule and the image build share it (`standin-net down` would
        # take it away from a stopped CT of theirs); molecule/run.sh removes it at the end.


# --- (6) not root, not Proxmox -------------------------------------------------------------------
def test_refuses_without_root() -> None:
    env = settings_env(base_settings(9124))
    with INSTALL_SH.open() as script:  # on stdin: the repository may be unreadable for nobody
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s"],
            env=env,
            stdin=script,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result
    assert "run this as root" in result.stderr
    assert 9124 not in ct_ids()


def test_refuses_without_proxmox(tmp_path: Path) -> None:
    # Every Proxmox tool but pveversion, as on a Debian host with lxc and a copied pct.
    for tool in ("pct", "pveam", "pvesm", "pvesh"):
        (tmp_path / tool).symlink_to(STANDIN / tool)
    env = settings_env(base_settings(9124))
    env["PATH"] = f"{tmp_path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    run = install(env=env)
    assert run.rc == 2, run.out
    assert "not a Proxmox VE host (pveversion not found)" in run.out
    assert 9124 not in ct_ids()


# --- (5) bad settings ----------------------------------------------------------------------------
BAD_SETTINGS = [
    ({"ram": "abc"}, "var_ram must be a whole number from 1024"),
    ({"ram": "512"}, "var_ram must be a whole number from 1024"),
    ({"cpu": "-1"}, "var_cpu must be a whole number"),
    ({"disk": "8G"}, "var_disk must be a whole number"),
    ({"ctid": "42"}, "var_ctid must be a whole number from 100"),
    ({"hostname": "a;rm -rf /"}, "var_hostname must be a host name"),
    ({"hostname": "-lead.example"}, "var_hostname must be a host name"),
    ({"hostname": "x" * 64}, "var_hostname must be a host name"),
    ({"model": "huge-v9"}, "var_model must be one of: tiny.en tiny base.en base"),
    ({"net": "10.77.77.300/24"}, "var_net must be 'dhcp' or an IPv4 address with prefix"),
    ({"net": "10.77.77.124"}, "var_net must be 'dhcp' or an IPv4 address with prefix"),
    ({"net": "dhcp", "gateway": "10.77.77.1"}, "var_gateway needs a static var_net"),
    ({"gateway": "$(reboot)"}, "var_gateway must be an IPv4 address"),
    ({"bridge": "vmbr9"}, "no bridge 'vmbr9' on this host"),
    ({"bridge": "br;ls"}, "var_bridge must be an interface name"),
    ({"storage": "nfs-backup"}, "var_storage 'nfs-backup' is no storage for CT disks here"),
    ({"template_storage": "local-lvm"}, "var_template_storage 'local-lvm' is no storage for CT"),
    ({"unprivileged": "yes"}, "var_unprivileged must be 0 or 1"),
    ({"image": "/nonexistent.tar.zst"}, "var_image: no readable file"),
    ({"image_sha256": "abc"}, "var_image_sha256 must be 64 hex digits"),
    ({"release_url": "ftp://mirror/x"}, "var_release_url must be an http(s) URL"),
    ({"unattended": "maybe"}, "var_unattended must be 0 or 1"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SETTINGS, ids=[str(b) for b, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_anything_changes(bad: dict[str, str], message: str) -> None:
    before = (ct_ids(), templates())
    run = install(INSTALL_SH, "--unattended", timeout=120, **base_settings(9124, **bad))
    assert run.rc == 2, run.out
    assert message in run.out
    assert "nothing was changed" in run.out
    assert (ct_ids(), templates()) == before


def test_development_copy_needs_a_checksum() -> None:
    settings = base_settings(9124)
    del settings["image_sha256"]
    run = install(INSTALL_SH, timeout=120, **settings)
    assert run.rc == 2, run.out
    assert "not a release (no pinned checksum)" in run.out
    assert 9124 not in ct_ids()


def test_foreign_ct_is_left_alone() -> None:
    VZTMPL.mkdir(parents=True, exist_ok=True)
    if not (VZTMPL / BASE.name).exists():
        shutil.copy(BASE, VZTMPL / BASE.name)
    net0 = "name=eth0,bridge=vmbr0,ip=10.77.77.125/24"
    pct(
        "create",
        "9125",
        f"local:vztmpl/{BASE.name}",
        "--hostname",
        "someone-else",
        "--tags",
        "database",
        "--net0",
        net0,
    )
    config = (STANDIN_ROOT / "pve" / "lxc" / "9125.conf").read_bytes()
    run = install(INSTALL_SH, "--unattended", timeout=120, **base_settings(9125))
    assert run.rc == 2, run.out
    assert "CT 9125 exists and is not a Whisper appliance" in run.out
    assert (STANDIN_ROOT / "pve" / "lxc" / "9125.conf").read_bytes() == config
    assert pct("status", "9125").strip() == "status: stopped"
    destroy(9125)


# --- interactive: whiptail on a terminal --------------------------------------------------------
class Terminal:
    """install.sh on a pseudo-terminal, answered key by key like a user at the console."""

    def __init__(self, env: dict[str, str]) -> None:
        self.fd, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            ["bash", str(INSTALL_SH)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.screen = b""  # not yet matched by read()
        self.log = b""  # everything shown

    def read(self, until: str, timeout: float = 30) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if until.encode() in self.screen:
                self.screen = self.screen.split(until.encode(), 1)[1]
                return True
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                    self.screen += chunk
                    self.log += chunk
                except OSError:  # the installer ended
                    break
        return False

    def answer(self, prompt: str, keys: str) -> None:
        assert self.read(prompt), f"no dialog {prompt!r} on the screen: {self.screen[-500:]!r}"
        time.sleep(0.3)
        os.write(self.fd, keys.encode())


def test_interactive_answers_are_validated_like_variables() -> None:
    if shutil.which("whiptail") is None:
        pytest.fail("whiptail missing: make setup WITH_LXC=1 installs it")
    env = settings_env(base_settings(9124, image_sha256="0" * 64))
    env["TERM"] = "xterm"
    term = Terminal(env)
    try:
        term.answer("Install with these settings?", "\t\r")  # <No>: change them
        term.answer("Container ID", "\r")
        term.answer("Host name", "\x7f" * 40 + "bad;name\r")
        for prompt in ("CPU cores", "RAM", "Disk size", "Storage for", "Network bridge", "IPv4"):
            term.answer(prompt, "\r")
        term.answer("Gateway", "\r")
        term.answer("Speech model", "\r")
        assert term.proc.wait(timeout=60) == 2
        term.read("nothing was changed", timeout=5)
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", " ", term.log.decode(errors="replace"))
        assert "var_hostname must be a host name" in text and "'bad;name'" in text, text[-800:]
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.fd)
    assert 9124 not in ct_ids()


# --- (3) wrong checksum --------------------------------------------------------------------------
def test_wrong_checksum_of_a_download_is_refused(tmp_path: Path) -> None:
    """A release installer pinned to one file; the server hands out another one."""
    pinned = tmp_path / "install.sh"
    pinned.write_text(
        re.sub(
            r"^RELEASE_SHA256=.*$",
            f'RELEASE_SHA256="{sha256(BASE)}"',
            re.sub(
                r"^RELEASE_VERSION=.*$",
                'RELEASE_VERSION="0.0.0-test"',
                INSTALL_SH.read_text(),
                flags=re.M,
            ),
            flags=re.M,
        )
    )
    served = tmp_path / "release"
    served.mkdir()
    name = "whisper-appliance-0.0.0-test-debian-12_amd64.tar.zst"
    (served / name).write_bytes(BASE.read_bytes()[: 1 << 20] + b"tampered")
    before = (ct_ids(), templates())
    settings = base_settings(9122)
    del settings["image"], settings["image_sha256"]
    with serve_directory(served) as url:
        run = install(pinned, "--unattended", timeout=120, release_url=url, **settings)
    assert run.rc == 1, run.out
    assert f"checksum mismatch: {name} is not the expected template" in run.out
    assert (ct_ids(), templates()) == before  # no CT, no file, no .part


def test_wrong_checksum_of_a_local_file_is_refused() -> None:
    before = (ct_ids(), templates())
    run = install(INSTALL_SH, timeout=120, **base_settings(9122, image_sha256="0" * 64))
    assert run.rc == 1, run.out
    assert "checksum mismatch" in run.out and "not used" in run.out
    assert (ct_ids(), templates()) == before


# --- (4) never healthy: rollback -----------------------------------------------------------------
@pytest.mark.timeout(600)
def test_ct_that_never_gets_healthy_is_destroyed() -> None:
    run = install(INSTALL_SH, "--unattended", **base_settings(9123))
    assert run.rc == 1, run.out
    assert "CT 9123 created and started" in run.out
    assert "not healthy after 20 s" in run.out
    assert "removing the half-created CT 9123" in run.out and "CT 9123 removed" in run.out
    assert 9123 not in ct_ids()
    assert not (STANDIN_ROOT / "lxc" / "9123").exists()
    assert BASE.name in templates()  # the verified template stays for the next run


@pytest.mark.timeout(600)
def test_interrupted_install_is_rolled_back() -> None:
    """Ctrl-C, a closed SSH session, a killed job: the half-created CT goes as well."""
    with subprocess.Popen(
        ["bash", str(INSTALL_SH)],
        env=settings_env(base_settings(9121, health_timeout="300")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        shown = ""
        for line in proc.stdout:
            shown += line
            if "waiting for the appliance" in line:
                proc.send_signal(signal.SIGTERM)
                break
        shown += proc.stdout.read()
        assert proc.wait(timeout=120) == 130, shown
    assert "removing the half-created CT 9121" in shown and "CT 9121 removed" in shown
    assert 9121 not in ct_ids()


# --- (1) end to end with the release, (2) re-run -------------------------------------------------
def release_settings(url: str) -> dict[str, str]:
    return {
        "ctid": "9120",
        "hostname": "wa-install",
        "net": "10.77.77.120/24",
        "gateway": GATEWAY,
        "model": "base",
        "health_timeout": "600",
        "release_url": url,
    }


def check_summary(run: Run) -> None:
    summary = run.summary()
    assert summary == {
        "URL": "https://10.77.77.120:5001",
        "Admin password": f"pct exec 9120 -- cat {PASSWORD_FILE}",
        "CA certificate": "http://10.77.77.120/ca.crt",
    }
    # The printed command shows the password, and the CA from the printed link verifies the URL.
    password = pct(*summary["Admin password"].split()[1:]).strip()
    assert len(password) >= 12
    ca = httpx.get(summary["CA certificate"], timeout=10, trust_env=False).text
    assert ca.startswith("-----BEGIN CERTIFICATE-----")
    context = ssl.create_default_context(cadata=ca)
    health = httpx.get(summary["URL"] + "/health", verify=context, timeout=10, trust_env=False)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok", health.text
    status = httpx.get(summary["URL"] + "/api/status", verify=context, timeout=10, trust_env=False)
    assert status.json()["default_model"] == "base"  # var_model reached the service
    assert {m["name"]: m["state"] for m in status.json()["models"]}["base"] == "loaded"


@pytest.fixture(scope="module")
def release() -> Path:
    if not (RELEASE_SH.is_file() and IMAGE.is_file()):
        pytest.fail(
            f"{RELEASE_SH} or {IMAGE} missing: run `make installer` (make test-install does)"
        )
    assert f'RELEASE_SHA256="{sha256(IMAGE)}"' in RELEASE_SH.read_text(), "dist/install.sh is stale"
    return RELEASE_SH


@pytest.mark.timeout(1200)
def test_release_installs_end_to_end(release: Path) -> None:
    with serve_directory(IMAGE.parent) as url:
        run = install(release, **release_settings(url))
    assert run.rc == 0, run.out
    assert "checksum verified" in run.out and "model base" in run.out
    check_summary(run)
    config = pct("config", "9120")
    for line in (
        "tags: whisper-appliance",
        "onboot: 1",
        "unprivileged: 1",
        "memory: 3072",
        "cores: 2",
        "hostname: wa-install",
        "features: nesting=1",
    ):
        assert line in config.splitlines(), config
    assert "rootfs: local-lvm:9120/" in config
    env_file = pct("exec", "9120", "--", "cat", "/etc/whisper-appliance/env")
    assert "WHISPER_MODEL=base" in env_file.splitlines()
    assert pct("exec", "9120", "--", "stat", "-c", "%a", PASSWORD_FILE).strip() == "600"
    assert IMAGE.name in templates() and not [t for t in templates() if ".part" in t]
    assert sha256(VZTMPL / IMAGE.name) == sha256(IMAGE)


@pytest.mark.timeout(900)
def test_rerun_starts_the_same_ct_and_creates_nothing(release: Path) -> None:
    assert 9120 in ct_ids(), "needs the CT of test_release_installs_end_to_end"
    pct("stop", "9120")
    before = ct_ids()
    settings = release_settings("http://127.0.0.1:9/nothing-here")  # nothing may be downloaded
    del settings["ctid"]  # found by host name and tag, as when re-running the one-liner
    run = install(release, **settings)
    assert run.rc == 0, run.out
    assert "CT 9120 is already a Whisper appliance: not recreated" in run.out
    assert "CT 9120 started" in run.out
    assert "downloading" not in run.out and "model base (was" not in run.out
    assert ct_ids() == before
    check_summary(run)
