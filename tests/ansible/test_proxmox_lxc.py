"""The proxmox_lxc role against a scripted fake `pct`/`pveam` (no LXC, no root): the pct
command line it builds, adoption of a matching CT, refusal of a foreign one. The real
end-to-end run is molecule's `proxmox` scenario."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or str(ROOT / ".venv/bin/ansible-playbook")

# Logs every call; `pct config` answers from $FAKE_CONFIG when that file exists.
FAKE_PCT = """#!/bin/sh
echo "pct $*" >> "$FAKE_LOG"
case "$1" in
  config) [ -f "$FAKE_CONFIG" ] && exec cat "$FAKE_CONFIG"
          echo "Configuration file 'nodes/pve/lxc/$2.conf' does not exist" >&2; exit 2 ;;
  status) echo "status: running" ;;
  exec) echo "2: eth0    inet 10.0.0.7/24 brd 10.0.0.255 scope global eth0" ;;
esac
"""
FAKE_PVEAM = """#!/bin/sh
echo "pveam $*" >> "$FAKE_LOG"
case "$1" in
  list) echo "NAME SIZE" ;;
  available) printf 'system debian-11-standard_11.7-1_amd64.tar.zst\\n'
             printf 'system debian-12-standard_12.2-1_amd64.tar.zst\\n'
             printf 'system debian-12-standard_12.7-1_amd64.tar.zst\\n' ;;
esac
"""


def _run(tmp_path: Path, config: str | None) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("pct", FAKE_PCT), ("pveam", FAKE_PVEAM)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if config is not None:
        (tmp_path / "config").write_text(config)
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITEST test\n")
    play = {
        "hosts": "pve",
        "gather_facts": False,
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "proxmox_lxc_vmid": 120,
            "proxmox_lxc_hostname": "whisper",
            "proxmox_lxc_ip": "10.0.0.7/24",
            "proxmox_lxc_gateway": "10.0.0.1",
            "proxmox_lxc_ssh_public_key_file": str(key),
            # nothing listens: the fake CT's SSH check is skipped
            "proxmox_lxc_network_timeout": 1,
        },
        "roles": ["proxmox_lxc"],
        "post_tasks": [
            {
                "name": "Show the added host",
                "ansible.builtin.debug": {
                    "msg": "{{ hostvars.whisper.ansible_host }} {{ groups.whisper_appliance }}"
                },
            }
        ],
    }
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play]))
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_CONFIG": str(tmp_path / "config"),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_HOME": str(tmp_path / "home"),
    }
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "pve,", str(tmp_path / "play.yml"), "--skip-tags", "ssh-wait"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    return result, log.read_text() if log.exists() else ""


def test_creates_the_container_with_pct(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, config=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pveam download local debian-12-standard_12.7-1_amd64.tar.zst" in calls
    create = next(line for line in calls.splitlines() if line.startswith("pct create"))
    for part in (
        "pct create 120 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "--hostname whisper",
        "--net0 name=eth0,bridge=vmbr0,ip=10.0.0.7/24,gw=10.0.0.1",
        "--unprivileged 1",
        "--features nesting=1",
        "--onboot 1",
        "--ostype debian",
        "--ssh-public-keys /",
    ):
        assert part in create, create
    assert "10.0.0.7 ['whisper']" in result.stdout


def test_adopts_a_matching_container(tmp_path: Path) -> None:
    config = "arch: amd64\ncores: 1\nhostname: whisper\nmemory: 4096\nonboot: 1\nswap: 512\n"
    result, calls = _run(tmp_path, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pct create" not in calls
    assert "pct set 120 --cores 2\n" in calls  # only what differs is aligned
    assert "10.0.0.7 ['whisper']" in result.stdout


@pytest.mark.parametrize("hostname", ["someone-else"])
def test_refuses_a_foreign_container(tmp_path: Path, hostname: str) -> None:
    result, calls = _run(tmp_path, config=f"hostname: {hostname}\nmemory: 512\n")
    assert result.returncode != 0
    assert "CT 120 exists with hostname 'someone-else', not 'whisper'" in result.stdout
    assert "pct create" not in calls and "pct set" not in calls
