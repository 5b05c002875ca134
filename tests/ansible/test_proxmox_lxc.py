"""The proxmox_lxc role against a scripted fake `pct`/`pveam` (no LXC, no root): the pct
command line it builds, adoption of a matching CT, refusal of a foreign one. The real
end-to-end run is molecule's `proxmox` scenario."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.ansible.fake_proxmox import (
    FAKE_PCT,
    ansible_env,
    calls,
    install_commands,
    play,
    write_play,
)

# pveam logs its calls and offers three templates (the newest Debian 12 must be chosen)
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
    install_commands(bin_dir, {"pct": FAKE_PCT, "pveam": FAKE_PVEAM})
    if config is not None:
        (tmp_path / "config").write_text(config)
    show_host = {
        "name": "Show the added host",
        "ansible.builtin.debug": {
            "msg": "{{ hostvars.whisper.ansible_host }} {{ groups.whisper_appliance }}"
        },
    }
    write_play(tmp_path, {}, [show_host])
    result = play(tmp_path, ansible_env(tmp_path, bin_dir), timeout=120)
    return result, calls(tmp_path)


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
