"""scripts/build_test_releases.py: the releases the molecule update test applies are real signed
releases (N+1, a broken N+2, N+3 under an untrusted key), built from a wheelhouse without
downloading anything, and rebuilt only when their inputs change."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from appliance.system.update.release import (
    ReleaseError,
    fetch_verified,
    load_public_key,
    unpack_wheelhouse,
)
from appliance.system.update.version import version_key

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_test_releases.py"

pytestmark = pytest.mark.slow


def fake_wheelhouse(path: Path) -> Path:
    """A wheelhouse shaped like `make dist`'s: one dependency wheel, an appliance wheel."""
    path.mkdir()
    files = {
        "dummy_dep-1.0-py3-none-any.whl": b"dependency",
        "whisper_appliance-0.1.0-py3-none-any.whl": b"the installed release",
    }
    for name, data in files.items():
        (path / name).write_bytes(data)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    (path / "SHA256SUMS").write_text(sums)
    (path / "VERSION").write_text("0.1.0\n")
    (path / "PYTHON").write_text("3.11\n")
    return path


def build(wheelhouse: Path, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheelhouse", str(wheelhouse), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_builds_signed_releases_and_caches_them(tmp_path: Path) -> None:
    wheelhouse = fake_wheelhouse(tmp_path / "wheelhouse")
    out = tmp_path / "releases"
    build(wheelhouse, out)
    index = json.loads((out / "releases.json").read_text())
    trusted = [load_public_key(out / "keys" / "trusted.pub")]
    versions = [index[name]["version"] for name in ("next", "broken", "untrusted")]
    assert versions == ["0.1.0+update1", "0.1.0+update2", "0.1.0+update3"]
    assert all(version_key(v) > version_key("0.1.0") for v in versions)
    assert index["next"]["path"].endswith(".release.tar")

    for name in ("next", "broken"):
        release = fetch_verified(index[name]["path"], tmp_path / f"stage-{name}", trusted)
        assert release.manifest.version == index[name]["version"]
        files = unpack_wheelhouse(release.tarball, tmp_path / f"unpacked-{name}")
        # the dependency wheels are the wheelhouse's own, hard-linked, not downloaded
        assert "dummy_dep-1.0-py3-none-any.whl" in files
        (wheel,) = (f for f in files if f.startswith("whisper_appliance-"))
        assert wheel == f"whisper_appliance-{release.manifest.version}-py3-none-any.whl"
        with zipfile.ZipFile(tmp_path / f"unpacked-{name}" / wheel) as zf:
            health = zf.read("appliance/web/api/system.py").decode()
        assert ("ok = False" in health) == (name == "broken")

    with pytest.raises(ReleaseError, match="bad signature"):
        fetch_verified(index["untrusted"]["path"], tmp_path / "stage-untrusted", trusted)
    untrusted = [load_public_key(out / "keys" / "untrusted.pub")]
    assert fetch_verified(index["untrusted"]["path"], tmp_path / "stage-u2", untrusted)

    assert "up to date" in build(wheelhouse, out)
    key = (out / "keys" / "trusted.pub").read_bytes()
    (wheelhouse / "SHA256SUMS").write_text((wheelhouse / "SHA256SUMS").read_text() + "\n")
    assert "built in" in build(wheelhouse, out)  # a changed wheelhouse: built again
    assert (out / "keys" / "trusted.pub").read_bytes() == key  # with the same, trusted key


def test_refuses_a_missing_wheelhouse(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheelhouse", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "run `make dist` first" in result.stderr
    assert not (tmp_path / "o").exists()
