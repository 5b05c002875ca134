"""playbooks/proxmox-create.yml on two fake Proxmox nodes of one cluster (fake_proxmox's
stateful `pct`/`pveam`, VMIDs unique across the nodes): the containers each node's
proxmox_lxc_containers lists are created on that node with their resources and land in their
inventory groups, a second run changes nothing, a VMID or hostname listed twice stops the run
before any container is made, and hosts with the single-CT variables work as before."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible.fake_proxmox import (
    ROOT,
    ansible_env,
    calls,
    install_cluster,
    read_config,
    run_playbook,
)

EXAMPLE = ROOT / "inventory" / "proxmox-cluster.example.yml"
GROUPS = ("whisper_appliance", "whisper_db", "whisper_lb")


def _run(
    tmp_path: Path, nodes: dict[str, dict[str, Any]], *inventories: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """proxmox-create.yml on the fake `nodes` (name -> host vars, merged over `inventories`),
    then the groups and the added hosts' variables as the next play sees them."""
    cluster, interpreters = install_cluster(tmp_path, list(nodes))
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITEST test\n")
    hosts = {
        name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": interpreters[name],
            "proxmox_lxc_ssh_public_key_file": str(key),
            **variables,
        }
        for name, variables in nodes.items()
    }
    fake = tmp_path / "nodes.yml"
    fake.write_text(yaml.safe_dump({"all": {"children": {"proxmox": {"hosts": hosts}}}}))
    dump = tmp_path / "inventory.json"
    show = {
        "name": "Write down the inventory the next plays get",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "__cts": "{{ groups['all'] | reject('in', groups['proxmox']) | list }}",
        },
        "tasks": [
            {
                "name": "Dump",
                "ansible.builtin.copy": {
                    "dest": str(dump),
                    "mode": "0600",
                    "content": "{{ {'groups': groups, 'hosts': dict(__cts | zip("
                    "__cts | map('extract', hostvars, 'ansible_host') | zip("
                    "__cts | map('extract', hostvars, 'proxmox_lxc_proxmox_host'),"
                    "__cts | map('extract', hostvars, 'proxmox_lxc_vmid'))))} | to_json }}",
                },
            }
        ],
    }
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(
        yaml.safe_dump(
            [{"ansible.builtin.import_playbook": str(ROOT / "playbooks/proxmox-create.yml")}, show]
        )
    )
    dump.unlink(missing_ok=True)
    sources = [arg for inventory in (*inventories, fake) for arg in ("-i", str(inventory))]
    env = ansible_env(tmp_path, tmp_path / "bin", FAKE_CLUSTER=str(cluster))
    result = run_playbook(env, *sources, str(playbook), timeout=240)
    return result, json.loads(dump.read_text()) if dump.exists() else {}


def _recap(result: subprocess.CompletedProcess[str], host: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(f"{host} "))


def test_the_example_places_each_container_on_its_node(tmp_path: Path) -> None:
    """inventory/proxmox-cluster.example.yml as it stands: four CTs on two nodes, each with its
    resources and in its group; the second run changes nothing."""
    result, seen = _run(tmp_path, {"pve1": {}, "pve2": {}}, EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    cluster = tmp_path / "cluster" / "nodes"
    assert sorted(p.name for p in (cluster / "pve1" / "lxc").glob("*.conf")) == [
        "140.conf",
        "141.conf",
        "151.conf",
    ]
    assert sorted(p.name for p in (cluster / "pve2" / "lxc").glob("*.conf")) == ["152.conf"]
    db = read_config(cluster / "pve1" / "lxc" / "140.conf")
    assert db["hostname"] == "whisper-db"
    assert (db["cores"], db["memory"], db["swap"]) == ("2", "2048", "512")
    assert db["rootfs"] == "local-lvm:vm-140-disk-0,size=32G"
    assert db["net0"] == "name=eth0,bridge=vmbr0,ip=192.0.2.40/24,gw=192.0.2.1"
    lb = read_config(cluster / "pve1" / "lxc" / "141.conf")
    assert (lb["cores"], lb["memory"], lb["rootfs"]) == (
        "1",
        "512",
        "local-lvm:vm-141-disk-0,size=4G",
    )
    # no overrides: the host-wide values of inventory/group_vars/proxmox.yml
    node2 = read_config(cluster / "pve2" / "lxc" / "152.conf")
    assert (node2["hostname"], node2["cores"], node2["memory"]) == ("whisper-node2", "2", "4096")
    assert node2["rootfs"] == "local-lvm:vm-152-disk-0,size=16G"
    assert (node2["unprivileged"], node2["features"], node2["onboot"]) == ("1", "nesting=1", "1")

    assert {group: sorted(seen["groups"][group]) for group in GROUPS} == {
        "whisper_appliance": ["whisper-node1", "whisper-node2"],
        "whisper_db": ["whisper-db"],
        "whisper_lb": ["whisper-lb"],
    }
    assert seen["hosts"] == {
        "whisper-db": ["192.0.2.40", "pve1", 140],
        "whisper-lb": ["192.0.2.41", "pve1", 141],
        "whisper-node1": ["192.0.2.51", "pve1", 151],
        "whisper-node2": ["192.0.2.52", "pve2", 152],
    }

    first = calls(tmp_path)
    assert "pve1: pveam download local debian-12-standard_12.7-1_amd64.tar.zst" in first
    assert "pve2: pct create 152 " in first and "pve1: pct create 152" not in first
    again, seen_again = _run(tmp_path, {"pve1": {}, "pve2": {}}, EXAMPLE)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in _recap(again, "pve1") and "changed=0" in _recap(again, "pve2")
    second = calls(tmp_path)[len(first) :]
    for verb in ("pct create", "pct set", "pct start", "pveam download"):
        assert verb not in second, second
    assert seen_again == seen


def test_an_adopted_container_is_aligned_with_its_item(tmp_path: Path) -> None:
    """A changed item (more memory for the LB) is applied to the existing CT with pct set."""
    lb: dict[str, Any] = {"vmid": 141, "hostname": "whisper-lb", "group": "whisper_lb"}
    result, _ = _run(tmp_path, {"pve1": {"proxmox_lxc_containers": [lb]}})
    assert result.returncode == 0, result.stdout + result.stderr
    before = calls(tmp_path)
    result, seen = _run(tmp_path, {"pve1": {"proxmox_lxc_containers": [{**lb, "memory_mb": 1024}]}})
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls(tmp_path)[len(before) :].count("pct set") == 1
    assert "pve1: pct set 141 --memory 1024\n" in calls(tmp_path)
    assert read_config(tmp_path / "cluster/nodes/pve1/lxc/141.conf")["memory"] == "1024"
    assert seen["groups"]["whisper_lb"] == ["whisper-lb"]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (
            {
                "pve1": [{"vmid": 150, "hostname": "node-a"}],
                "pve2": [{"vmid": 150, "hostname": "node-b"}],
            },
            "vmid 150 is listed twice: node-a on pve1, node-b on pve2.",
        ),
        (
            {
                "pve1": [{"vmid": 150, "hostname": "node-a"}, {"vmid": 151, "hostname": "node-a"}],
                "pve2": [{"vmid": 152, "hostname": "node-b"}],
            },
            "hostname node-a is listed twice: VMID 150 on pve1, VMID 151 on pve1.",
        ),
    ],
)
def test_a_container_listed_twice_is_refused(
    tmp_path: Path, nodes: dict[str, list[dict[str, Any]]], message: str
) -> None:
    result, _ = _run(tmp_path, {n: {"proxmox_lxc_containers": cts} for n, cts in nodes.items()})
    assert result.returncode != 0
    assert message in result.stdout, result.stdout
    assert "pct create" not in calls(tmp_path) and "pveam" not in calls(tmp_path)


def test_an_unknown_key_is_refused(tmp_path: Path) -> None:
    ct = {"vmid": 150, "hostname": "node-a", "memory": 2048}  # memory_mb is meant
    result, _ = _run(tmp_path, {"pve1": {"proxmox_lxc_containers": [ct]}})
    assert result.returncode != 0
    assert "Validation of arguments failed" in result.stdout, result.stdout
    assert "memory" in result.stdout and "pct create" not in calls(tmp_path)


def test_single_container_hosts_work_as_before(tmp_path: Path) -> None:
    """Two Proxmox hosts with proxmox_lxc_vmid: one CT each, both in whisper_appliance."""
    nodes = {
        "pve1": {
            "proxmox_lxc_vmid": 120,
            "proxmox_lxc_hostname": "whisper",
            "proxmox_lxc_cores": 4,
        },
        "pve2": {"proxmox_lxc_vmid": 121, "proxmox_lxc_hostname": "whisper2"},
    }
    result, seen = _run(tmp_path, nodes)
    assert result.returncode == 0, result.stdout + result.stderr
    create = next(line for line in calls(tmp_path).splitlines() if "pve1: pct create" in line)
    assert create.startswith(
        "pve1: pct create 120 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
        " --hostname whisper --cores 4 --memory 4096 --swap 512 --rootfs local-lvm:16"
        " --net0 name=eth0,bridge=vmbr0,ip=dhcp --unprivileged 1 --features nesting=1"
        " --onboot 1 --tags whisper --ostype debian --ssh-public-keys /"
    ), create
    assert sorted(seen["groups"]["whisper_appliance"]) == ["whisper", "whisper2"]
    assert seen["hosts"]["whisper2"] == ["10.99.0.121", "pve2", 121]
    again, _ = _run(tmp_path, nodes)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in _recap(again, "pve1") and "changed=0" in _recap(again, "pve2")
