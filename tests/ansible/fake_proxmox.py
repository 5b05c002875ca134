"""A fake Proxmox host for the proxmox_lxc role's tests: scripted `pct` (logs every call,
answers `pct config` from $FAKE_CONFIG), the play that runs the role against it, and the
environment and command line that run ansible-playbook locally. No LXC, no root."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or str(ROOT / ".venv/bin/ansible-playbook")

FAKE_PCT = """#!/bin/sh
echo "pct $*" >> "$FAKE_LOG"
case "$1" in
  config) [ -f "$FAKE_CONFIG" ] && exec cat "$FAKE_CONFIG"
          echo "Configuration file 'nodes/pve/lxc/$2.conf' does not exist" >&2; exit 2 ;;
  status) echo "status: ${FAKE_STATUS:-running}" ;;
  exec) case "$*" in
          *nvidia-smi*) echo "GPU 0: NVIDIA RTX A2000 (UUID: GPU-0000)" ;;
          *ldconfig*) ;;
          *) echo "2: eth0    inet 10.0.0.7/24 brd 10.0.0.255 scope global eth0" ;;
        esac ;;
esac
"""


def install_commands(bin_dir: Path, commands: dict[str, str]) -> None:
    """Write the scripted commands (name -> shell script) into `bin_dir`, executable."""
    bin_dir.mkdir(exist_ok=True)
    for name, text in commands.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def write_play(tmp_path: Path, variables: dict[str, Any], post_tasks: list[Any]) -> Path:
    """play.yml: the proxmox_lxc role for CT 120 `whisper` on the local `pve` host."""
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
            **variables,
        },
        "roles": ["proxmox_lxc"],
        "post_tasks": post_tasks,
    }
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump([play]))
    return path


def ansible_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a local ansible-playbook run with the fake commands first on PATH."""
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_CONFIG": str(tmp_path / "config"),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_HOME": str(tmp_path / "home"),
        **extra,
    }


def play(
    tmp_path: Path, env: dict[str, str], *extra_args: str, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    """Run play.yml against `pve` (the CT's SSH wait skipped)."""
    return subprocess.run(
        [
            ANSIBLE_PLAYBOOK,
            "-i",
            "pve,",
            str(tmp_path / "play.yml"),
            *extra_args,
            "--skip-tags",
            "ssh-wait",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def calls(tmp_path: Path) -> str:
    """Every fake command call so far, one per line."""
    log = tmp_path / "calls.log"
    return log.read_text() if log.exists() else ""
