"""Static checks of the Ansible roles: argument specs reject bad input with a clear message,
specs and defaults agree, the documented variables match the specs, and the repository's
systemd unit is the role's template rendered with its defaults."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# every role of the repository (a new one is checked without being listed here)
ROLES = tuple(sorted(p.parent.parent.name for p in ROOT.glob("roles/*/meta/argument_specs.yml")))
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or str(ROOT / ".venv/bin/ansible-playbook")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _options(role: str) -> dict[str, dict[str, Any]]:
    spec = _load(ROOT / "roles" / role / "meta" / "argument_specs.yml")
    options: dict[str, dict[str, Any]] = spec["argument_specs"]["main"]["options"]
    return options


def _run_play(tmp_path: Path, play: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    play = {
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        **play,
        "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
    }
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump([play]))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LIBRARY": str(ROOT / "tests/ansible/library"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "ANSIBLE_HOME": str(tmp_path / "home"),
    }
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def _run_role(
    tmp_path: Path, role: str, params: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return _run_play(tmp_path, {"roles": [{"role": role, **params}]})


@pytest.mark.parametrize(
    ("role", "params", "message"),
    [
        (
            "whisper_appliance",
            {"whisper_appliance_https_port": "not-a-port"},
            "argument 'whisper_appliance_https_port' is of type str"
            " and we were unable to convert to int",
        ),
        (
            "whisper_appliance",
            {"whisper_appliance_engine": "whisper.cpp"},
            "value of whisper_appliance_engine must be one of: faster-whisper, openai-whisper",
        ),
        (
            "base",
            {"base_extra_packages": {"vim": True}},
            "argument 'base_extra_packages' is of type dict and we were unable to convert to list",
        ),
        (
            "firewall",
            {"firewall_allowed_tcp_ports": ["https"]},
            "Elements value for option 'firewall_allowed_tcp_ports' is of type str"
            " and we were unable to convert to int",
        ),
        ("proxmox_lxc", {}, "missing required arguments: proxmox_lxc_vmid"),
        ("inbox_share", {}, "missing required arguments: inbox_share_password"),
        (
            "proxmox_lxc",
            {"proxmox_lxc_vmid": 120, "proxmox_lxc_unprivileged": "maybe"},
            "argument 'proxmox_lxc_unprivileged' is of type str"
            " and we were unable to convert to bool",
        ),
    ],
)
def test_argument_spec_rejects_bad_input(
    tmp_path: Path, role: str, params: dict[str, Any], message: str
) -> None:
    result = _run_role(tmp_path, role, params)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Validation of arguments failed" in output, output
    assert message in output, output


@pytest.mark.parametrize("role", ROLES)
def test_defaults_match_argument_spec(role: str) -> None:
    defaults = _load(ROOT / "roles" / role / "defaults" / "main.yml") or {}
    options = _options(role)
    for name, option in options.items():
        assert name.startswith(f"{role}_"), f"{name}: public variables carry the role's prefix"
        assert option.get("description"), f"{name}: no description"
        assert "type" in option, f"{name}: no type"
        if option.get("required"):
            assert name not in defaults, f"{name} is required and must not have a default"
        else:
            assert name in defaults, f"{name} is in the spec but not in defaults/main.yml"
            assert option.get("default") == defaults[name], f"{name}: spec and defaults differ"
    assert set(defaults) <= set(options), f"undeclared defaults: {set(defaults) - set(options)}"


def test_docs_list_every_variable() -> None:
    """The role variables reference (generated from argument_specs by scripts/gen_docs.py)
    and each role's README name every variable."""
    docs = (ROOT / "docs" / "reference" / "ansible.md").read_text()
    for role in ROLES:
        readme = (ROOT / "roles" / role / "README.md").read_text()
        for name in _options(role):
            assert f"`{name}`" in docs, f"{name} missing from docs/reference/ansible.md"
            assert f"`{name}`" in readme, f"{name} missing from roles/{role}/README.md"


def test_systemd_unit_is_the_rendered_template() -> None:
    defaults = _load(ROOT / "roles/whisper_appliance/defaults/main.yml")
    template = (ROOT / "roles/whisper_appliance/templates/whisper-appliance.service.j2").read_text()
    env = jinja2.Environment(  # noqa: S701 - a systemd unit, not HTML
        keep_trailing_newline=True, trim_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.filters["bool"] = bool  # the template applies it to real booleans only
    rendered = env.from_string(template).render(
        **defaults,
        ansible_managed="managed",
        __whisper_appliance_memory_max="1312M",
        __whisper_appliance_bind_cap=True,
    )
    unit = (ROOT / "systemd/whisper-appliance.service").read_text()

    def body(text: str) -> str:
        return text[text.index("[Unit]") :]

    assert body(rendered) == body(unit)
    # MemoryMax of the static unit: base 512 MiB + 2 workers x 400 MiB (tiny.en).
    assert re.search(r"^MemoryMax=1312M$", unit, re.M)


@pytest.mark.parametrize(
    ("distribution", "major", "python"),
    [
        ("Debian", "12", "/usr/bin/python3.11"),
        ("Ubuntu", "22", "/usr/bin/python3.11"),
        ("Ubuntu", "24", "/usr/bin/python3.12"),
    ],
)
def test_roles_load_per_distribution_vars(
    tmp_path: Path, distribution: str, major: str, python: str
) -> None:
    """Ubuntu 22.04/24.04 cannot be provisioned here (only Debian's archive is reachable):
    check at least that each role picks that distribution's vars file."""
    security = "Debian-Security" if distribution == "Debian" else "-security"
    facts = {
        "distribution": distribution,
        "distribution_major_version": major,
        "os_family": "Debian",
    }
    result = _run_play(
        tmp_path,
        {
            "tasks": [
                {"name": "Pretend to be the distribution", "fake_facts": {"facts": facts}},
                {
                    "name": "Base vars",
                    "ansible.builtin.include_role": {"name": "base", "tasks_from": "vars.yml"},
                },
                {
                    "name": "Appliance vars",
                    "ansible.builtin.include_role": {
                        "name": "whisper_appliance",
                        "tasks_from": "vars.yml",
                    },
                },
                {
                    "name": "Check",
                    "ansible.builtin.assert": {
                        "that": [
                            "'ffmpeg' in __base_packages",
                            "'unattended-upgrades' in __base_packages",
                            f"__whisper_appliance_python == '{python}'",
                            f"(__base_unattended_origins | join(' ')) is search('{security}')",
                        ]
                    },
                },
            ]
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = f"roles/base/vars/{distribution}-{major}.yml"
    assert (ROOT / loaded).is_file()
