"""install.sh runs on a Proxmox host without this repository: what it copies from the code must
stay equal to it, and the lines `make installer` stamps must be there exactly once."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from appliance.core.auth import PASSWORD_FILE
from appliance.core.model_manager import CATALOGUE

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SH = ROOT / "install.sh"


def test_model_list_is_the_catalogue() -> None:
    text = INSTALL_SH.read_text()
    match = re.search(r"^MODELS=\(([^)]*)\)", text, re.M)
    assert match, "no MODELS=(...) in install.sh"
    assert match.group(1).split() == list(CATALOGUE)


def test_password_file_is_the_appliances() -> None:
    text = INSTALL_SH.read_text()
    assert f"PASSWORD_FILE=/var/lib/whisper-appliance/{PASSWORD_FILE}\n" in text


def test_stamped_lines_exist_once() -> None:
    lines = INSTALL_SH.read_text().splitlines()
    for name in ("RELEASE_VERSION", "RELEASE_SHA256"):
        assert sum(line.startswith(f"{name}=") for line in lines) == 1, name
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    assert f'RELEASE_VERSION="{version.group(1)}"' in lines


def test_help_and_unknown_argument() -> None:
    shown = subprocess.run(
        ["bash", str(INSTALL_SH), "--help"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0 and "var_ram" in shown.stdout
    bad = subprocess.run(
        ["bash", str(INSTALL_SH), "--bogus"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
