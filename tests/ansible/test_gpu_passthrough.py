"""The proxmox_lxc role's NVIDIA GPU passthrough (proxmox_lxc_gpu: nvidia) against a fake
Proxmox host: scripted `pct`, `pveam`, `ldconfig` and `nvidia-smi`, a /proc/devices with
non-standard majors, device nodes as plain files in a folder. Asserts the lines the role
writes into the CT's config file (and the `pct set --devN` call of the dev method); no real
GPU, LXC or Proxmox is involved (README.md, "GPU": untested on real hardware)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.ansible.fake_proxmox import (
    FAKE_PCT,
    ROOT,
    ansible_env,
    calls,
    install_commands,
    play,
    write_play,
)

FAKE_PVEAM = """#!/bin/sh
case "$1" in
  list) echo "NAME SIZE"; echo "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst 1" ;;
  available) printf 'system debian-12-standard_12.7-1_amd64.tar.zst\\n' ;;
esac
"""
LIB = "/usr/lib/x86_64-linux-gnu"
FAKE_LDCONFIG = f"""#!/bin/sh
echo "1234 libs found in cache \\`/etc/ld.so.cache'"
echo "	libnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => {LIB}/libnvidia-ptxjitcompiler.so.1"
echo "	libnvidia-ml.so.1 (libc6,x86-64) => {LIB}/libnvidia-ml.so.1"
echo "	libcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1"
echo "	libcuda.so.1 (libc6,x86-64) => {LIB}/libcuda.so.1"
echo "	libc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6"
"""
FAKE_SMI = """#!/bin/sh
echo "550.127.05"
"""
# majors of a real host differ from boot to boot for uvm and caps: none is hard-coded
PROC_DEVICES = """Character devices:
  1 mem
  4 /dev/vc/0
195 nvidia-frontend
226 drm
234 nvidia-nvswitch
236 nvidia-caps-imex-channels
503 nvidia-uvm
506 nvidia-caps

Block devices:
  8 sd
195 nvidia-frontend
"""


def _run(
    tmp_path: Path,
    variables: dict[str, object],
    *,
    existing: str | None = None,
    nodes: tuple[str, ...] = ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"),
    status: str = "running",
    runs: int = 1,
) -> tuple[subprocess.CompletedProcess[str], str, str]:
    bin_dir = tmp_path / "bin"
    install_commands(
        bin_dir,
        {"pct": FAKE_PCT, "pveam": FAKE_PVEAM, "ldconfig": FAKE_LDCONFIG, "nvidia-smi": FAKE_SMI},
    )
    dev = tmp_path / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    for node in (*nodes, "nvidia-modeset", "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2"):
        (dev / node).write_text("")
    (tmp_path / "devices").write_text(PROC_DEVICES)
    conf_dir = tmp_path / "pve"
    conf_dir.mkdir()
    # what `pct create` leaves behind, plus a snapshot section the lines must stay above
    conf = conf_dir / "120.conf"
    conf.write_text("hostname: whisper\nmemory: 4096\n\n[before-gpu]\nhostname: whisper\n")
    if existing is not None:
        (tmp_path / "config").write_text(existing)
    gpu = {
        "proxmox_lxc_gpu": "nvidia",
        "proxmox_lxc_gpu_binaries": [str(bin_dir / "nvidia-smi"), "/nonexistent/nvidia-debugdump"],
    }
    show_driver = {
        "name": "Show the driver version",
        "ansible.builtin.debug": {"msg": "driver {{ proxmox_lxc_gpu_driver_version }}"},
    }
    write_play(tmp_path, {**gpu, **variables}, [show_driver])
    internal = {  # the role's host paths (vars/main.yml), pointed at the fake host
        "__proxmox_lxc_conf_dir": str(conf_dir),
        "__proxmox_lxc_dev_dir": str(dev),
        "__proxmox_lxc_proc_devices": str(tmp_path / "devices"),
    }
    (tmp_path / "internal.yml").write_text(yaml.safe_dump(internal))
    env = ansible_env(tmp_path, bin_dir, FAKE_STATUS=status)
    for _ in range(runs):
        result = play(tmp_path, env, "-e", f"@{tmp_path / 'internal.yml'}")
    return result, calls(tmp_path), conf.read_text()


def test_lxc_method_writes_cgroup_rules_and_binds(tmp_path: Path) -> None:
    result, calls, conf = _run(tmp_path, {})
    assert result.returncode == 0, result.stdout + result.stderr
    dev = tmp_path / "dev"
    smi = tmp_path / "bin" / "nvidia-smi"
    bind = "none bind,optional,create=file"
    lines = [
        # majors read from /proc/devices (character devices only)
        "lxc.cgroup2.devices.allow: c 195:* rwm",
        "lxc.cgroup2.devices.allow: c 503:* rwm",
        "lxc.cgroup2.devices.allow: c 506:* rwm",
        f"lxc.mount.entry: {dev}/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file",
        f"lxc.mount.entry: {dev}/nvidia-uvm-tools dev/nvidia-uvm-tools {bind}",
        f"lxc.mount.entry: {dev}/nvidia0 dev/nvidia0 none bind,optional,create=file",
        f"lxc.mount.entry: {dev}/nvidia1 dev/nvidia1 none bind,optional,create=file",
        f"lxc.mount.entry: {dev}/nvidiactl dev/nvidiactl none bind,optional,create=file",
        f"lxc.mount.entry: {dev}/nvidia-caps dev/nvidia-caps none bind,optional,create=dir",
        # the host's driver, read-only, at the CT's library path (x86-64 entries only)
        "lxc.mount.entry: /usr/lib/x86_64-linux-gnu/libcuda.so.1 "
        "usr/lib/x86_64-linux-gnu/libcuda.so.1 none bind,ro,optional,create=file",
        "lxc.mount.entry: /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 "
        "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 none bind,ro,optional,create=file",
        "lxc.mount.entry: /usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1 "
        "usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1 none bind,ro,optional,create=file",
        f"lxc.mount.entry: {smi} {str(smi).lstrip('/')} none bind,ro,optional,create=file",
    ]
    main, snapshot = conf.split("[before-gpu]")
    assert [line for line in main.splitlines() if line.startswith("lxc.")] == lines
    assert "lxc." not in snapshot  # the snapshot section is left alone
    assert "nvidia-modeset" not in conf  # display only: not passed
    assert "nvidia-debugdump" not in conf  # a tool the host lacks is skipped
    assert "pct reboot" not in calls  # a new CT: started afterwards, nothing to restart
    assert "pct exec 120 -- ldconfig" in calls
    assert "pct exec 120 -- nvidia-smi -L" in calls
    assert "driver 550.127.05" in result.stdout


def test_chosen_gpus_and_no_driver_binds(tmp_path: Path) -> None:
    result, _, conf = _run(
        tmp_path, {"proxmox_lxc_gpu_indexes": [1], "proxmox_lxc_gpu_bind_driver": False}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dev/nvidia1 " in conf and "dev/nvidia0 " not in conf
    assert "libcuda" not in conf and "nvidia-smi" not in conf


def test_dev_method_uses_pct_devn_entries(tmp_path: Path) -> None:
    result, calls, conf = _run(tmp_path, {"proxmox_lxc_gpu_method": "dev"})
    assert result.returncode == 0, result.stdout + result.stderr
    dev = tmp_path / "dev"
    expected = " ".join(
        f"--dev{i} {dev}/{name},mode=0666"
        for i, name in enumerate(
            [
                "nvidia-caps/nvidia-cap1",
                "nvidia-caps/nvidia-cap2",
                "nvidia-uvm",
                "nvidia-uvm-tools",
                "nvidia0",
                "nvidia1",
                "nvidiactl",
            ]
        )
    )
    assert f"pct set 120 {expected}\n" in calls
    assert "lxc.cgroup2" not in conf  # pct makes the cgroup rules of devN entries itself
    assert "libcuda.so.1" in conf  # the driver is still bound with lxc.mount.entry


def test_adopted_running_container_is_restarted_once(tmp_path: Path) -> None:
    existing = "hostname: whisper\ncores: 2\nmemory: 4096\nswap: 512\nonboot: 1\n"
    result, calls, conf = _run(tmp_path, {}, existing=existing, runs=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pct create" not in calls
    assert calls.count("pct reboot 120") == 1  # the second run finds every line in place
    assert conf.count("lxc.cgroup2.devices.allow: c 195:* rwm") == 1


def test_adopted_stopped_container_is_not_restarted(tmp_path: Path) -> None:
    existing = "hostname: whisper\ncores: 2\nmemory: 4096\nswap: 512\nonboot: 1\n"
    result, calls, _ = _run(tmp_path, {}, existing=existing, status="stopped")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pct reboot" not in calls
    assert "pct start 120" in calls


@pytest.mark.parametrize(
    ("nodes", "message"), [(("nvidia0", "nvidiactl"), "the host's NVIDIA driver is not ready")]
)
def test_missing_uvm_node_stops_with_a_hint(
    tmp_path: Path, nodes: tuple[str, ...], message: str
) -> None:
    result, _, conf = _run(tmp_path, {}, nodes=nodes)
    assert result.returncode != 0
    assert message in result.stdout and "nvidia-modprobe -u -c0" in result.stdout
    assert "lxc." not in conf


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda"])
def test_service_unit_opens_only_the_nvidia_devices(device: str) -> None:
    """whisper_appliance_device other than cpu: the unit lets the service reach the GPU."""
    defaults = yaml.safe_load((ROOT / "roles/whisper_appliance/defaults/main.yml").read_text())
    env = jinja2.Environment(  # noqa: S701 - a systemd unit and an env file, not HTML
        keep_trailing_newline=True, trim_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.filters["bool"] = bool
    variables = {
        **defaults,
        "whisper_appliance_device": device,
        "ansible_managed": "managed",
        "__whisper_appliance_memory_max": "1312M",
        "__whisper_appliance_bind_cap": False,
    }
    templates = ROOT / "roles/whisper_appliance/templates"
    unit = env.from_string((templates / "whisper-appliance.service.j2").read_text()).render(
        **variables
    )
    lines = unit.splitlines()
    assert "DevicePolicy=closed" in lines
    allowed = [line for line in lines if line.startswith("DeviceAllow=")]
    if device == "cpu":
        assert "PrivateDevices=yes" in lines and not allowed
    else:
        assert "PrivateDevices=no" in lines
        assert allowed == [
            "DeviceAllow=char-nvidia-frontend rw",
            "DeviceAllow=char-nvidia-uvm rw",
            "DeviceAllow=char-nvidia-caps r",
        ]
    settings = env.from_string((templates / "env.j2").read_text()).render(**variables)
    assert f"DEVICE={device}\n" in settings
    assert "CUDA_COMPUTE_TYPE=float16\n" in settings
