"""scripts/check_commands.py finds what the fresh-machine check must resolve (make test-fresh)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("shfmt") is None, reason="shfmt: run make setup")


def load_checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "check_commands", ROOT / "scripts/check_commands.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_commands"] = module
    spec.loader.exec_module(module)
    return module


def test_the_scan_sees_commands_of_every_kind_of_file() -> None:
    found = load_checker().scan_project()
    # shell script, Makefile recipe through a make variable, Python subprocess, $SUDO apt-get,
    # a command behind `timeout`/`setsid`, and shutil.which
    for name, where in [
        ("mmdebstrap", "scripts/check_fresh_machine.sh"),
        ("podman", "mk/container.mk"),
        ("apt-get", "scripts/bootstrap.sh"),
        ("lxc-attach", "scripts/pct-standin/pct"),
        ("curl", "install.sh"),
        ("whiptail", "tests/install/test_install_sh.py"),
    ]:
        assert where in found.commands[name], (name, sorted(found.commands[name]))
    assert ("chromium", "chromium-browser") in [g for g, _ in found.alternatives]
    # the file wave 1 missed on a fresh host (Debian's lxc-templates)
    assert "/usr/share/lxc/config/debian.common.conf" in found.files
    # the throw-away PostgreSQL of the tests: initdb/pg_ctl by path, run as postgres
    assert "tests/pgserver.py" in found.commands["runuser"]
    assert "/usr/lib/postgresql/*/bin/initdb" in found.files
    # shell functions and builtins are not programs
    assert not {"need_stamp", "msg", "cd", "echo", "MAKEVAR"} & set(found.commands)


def test_wrappers_and_expansions() -> None:
    checker = load_checker()
    found = checker.Found()
    checker.scan_shell(
        'timeout -s KILL 5 env A=1 setsid zstd -d x; "$X" ignored; ip netns exec ns nft list; '
        "f() { true; }; f; $SUDO sysctl -w a=1; xargs -n1 basename",
        "t.sh",
        found,
    )
    for name in found.functions:
        found.commands.pop(name, None)
    assert set(found.commands) == {
        "timeout", "env", "setsid", "zstd", "ip", "nft", "sysctl", "xargs", "basename"
    }  # fmt: skip
