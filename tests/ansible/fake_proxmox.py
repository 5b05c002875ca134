"""A fake Proxmox host for the proxmox_lxc role's tests: scripted `pct` (logs every call,
answers `pct config` from $FAKE_CONFIG), the play that runs the role against it, and the
environment and command line that run ansible-playbook locally. No LXC, no root.

For several Proxmox nodes of one cluster, this file is itself the `pct` and `pveam` of every
node (`install_cluster`): their state lives in a folder shaped like Proxmox's cluster file system
(`nodes/<node>/lxc/<vmid>.conf`, so a VMID is unique across the nodes as in a real cluster),
and each node is a local inventory host whose Python interpreter sets $FAKE_NODE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    return run_playbook(env, "-i", "pve,", str(tmp_path / "play.yml"), *extra_args, timeout=timeout)


def run_playbook(
    env: dict[str, str], *args: str, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook with `args` from the repository root, the CTs' SSH wait skipped."""
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, *args, "--skip-tags", "ssh-wait"],
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


# --- a cluster of fake Proxmox nodes ------------------------------------------------------

TEMPLATES = (
    "debian-11-standard_11.7-1_amd64.tar.zst",
    "debian-12-standard_12.2-1_amd64.tar.zst",
    "debian-12-standard_12.7-1_amd64.tar.zst",
)


def install_cluster(tmp_path: Path, nodes: list[str]) -> tuple[Path, dict[str, str]]:
    """`pct` and `pveam` in tmp/bin, a cluster folder and one Python wrapper per node (kept
    when there already): returns the folder and each node's ansible_python_interpreter."""
    cluster = tmp_path / "cluster"
    command = f'#!/bin/sh\nexec {sys.executable} {__file__} "$(basename "$0")" "$@"\n'
    install_commands(tmp_path / "bin", {"pct": command, "pveam": command})
    interpreters = {}
    for node in nodes:
        (cluster / "nodes" / node / "lxc").mkdir(parents=True, exist_ok=True)
        (cluster / "nodes" / node / "vztmpl").mkdir(exist_ok=True)
        wrapper = cluster / "nodes" / node / "python"
        wrapper.write_text(f'#!/bin/sh\nFAKE_NODE={node} exec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        interpreters[node] = str(wrapper)
    return cluster, interpreters


def read_config(path: Path) -> dict[str, str]:
    """A CT's Proxmox-style "key: value" config file."""
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


class _Fail(Exception):
    """A command's error: the message Proxmox prints, exit status 2 (255 for CT state)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _Node:
    """One Proxmox node's view of the cluster folder."""

    def __init__(self, cluster: Path, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.home = cluster / "nodes" / name

    def conf(self, vmid: str) -> Path:
        path = self.home / "lxc" / f"{vmid}.conf"
        if not path.is_file():
            raise _Fail(f"Configuration file 'nodes/{self.name}/lxc/{vmid}.conf' does not exist")
        return path

    def write(self, vmid: str, config: dict[str, str]) -> None:
        text = "".join(f"{key}: {config[key]}\n" for key in sorted(config))
        (self.home / "lxc" / f"{vmid}.conf").write_text(text)

    def running(self, vmid: str) -> Path:
        return self.home / "lxc" / f"{vmid}.running"

    def pct(self, args: list[str]) -> str:
        sub, vmid, rest = args[0], args[1] if len(args) > 1 else "", args[2:]
        if sub == "create":
            return self.create(vmid, rest)
        conf = self.conf(vmid)
        if sub == "config":
            return conf.read_text()
        if sub == "set":
            self.write(vmid, {**read_config(conf), **_options(rest)})
        elif sub == "status":
            return f"status: {'running' if self.running(vmid).exists() else 'stopped'}\n"
        elif sub == "start":
            if self.running(vmid).exists():
                raise _Fail(f"CT {vmid} already running", 255)
            self.running(vmid).touch()
        elif sub in ("exec", "reboot"):
            if not self.running(vmid).exists():
                raise _Fail(f"CT {vmid} not running", 255)
            if sub == "exec" and "ip" in rest:
                net0 = dict(kv.split("=", 1) for kv in read_config(conf)["net0"].split(","))
                ip = net0["ip"] if net0["ip"] != "dhcp" else f"10.99.0.{int(vmid) % 250}/24"
                return f"2: eth0    inet {ip} brd 0.0.0.0 scope global eth0\n"
        else:
            raise _Fail(f"unknown command 'pct {sub}'", 255)
        return ""

    def create(self, vmid: str, args: list[str]) -> str:
        existing = sorted((self.cluster / "nodes").glob(f"*/lxc/{vmid}.conf"))
        if existing:
            node = existing[0].parent.parent.name
            raise _Fail(f"unable to create CT {vmid} - CT {vmid} already exists on node '{node}'")
        template, options = args[0], _options(args[1:])
        if not (self.home / "vztmpl" / template.split(":vztmpl/")[-1]).is_file():
            raise _Fail(f"volume '{template}' does not exist")
        if not Path(options.pop("ssh-public-keys")).is_file():
            raise _Fail("ssh-public-keys: file does not exist")
        storage, size = options.pop("rootfs").split(":")
        self.write(
            vmid, {"arch": "amd64", **options, "rootfs": f"{storage}:vm-{vmid}-disk-0,size={size}G"}
        )
        return ""

    def pveam(self, args: list[str]) -> str:
        store = self.home / "vztmpl"
        if args[0] == "list":
            return "NAME SIZE\n" + "".join(f"local:vztmpl/{p.name} 1MB\n" for p in store.iterdir())
        if args[0] == "available":
            return "".join(f"system {name}\n" for name in TEMPLATES)
        if args[0] == "download":
            if args[2] not in TEMPLATES:
                raise _Fail(f"400 Parameter verification failed. template: no such {args[2]}")
            (store / args[2]).touch()
        return ""


def _options(args: list[str]) -> dict[str, str]:
    """pct's `--key value` pairs."""
    return {key.removeprefix("--"): value for key, value in zip(args[::2], args[1::2], strict=True)}


def _main(command: str, args: list[str]) -> int:
    node = _Node(Path(os.environ["FAKE_CLUSTER"]), os.environ["FAKE_NODE"])
    with Path(os.environ["FAKE_LOG"]).open("a") as log:
        log.write(f"{node.name}: {command} {' '.join(args)}\n")
    try:
        sys.stdout.write(node.pct(args) if command == "pct" else node.pveam(args))
    except _Fail as error:
        sys.stderr.write(f"{error}\n")
        return error.status
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2:]))
