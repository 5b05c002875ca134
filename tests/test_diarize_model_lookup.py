"""Where the app looks for the converted speaker model, and that every deploy path puts it there:
`make dist` (scripts/dist.sh) into the wheelhouse, the Ansible role (and so the CT template) and
the Dockerfile into the install's models/ folder (/opt/whisper-appliance/models); DATA_DIR/models
(where `python -m appliance.core.diarize fetch` writes) comes first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from appliance.core import diarize

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT / ".cache" / "speaker" / "models" / diarize.NPZ_NAME


def _model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read by the lookup")
    return path


@pytest.fixture
def packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "opt" / "models"
    monkeypatch.setattr(diarize, "PACKAGED_MODEL_DIRS", (where,))
    monkeypatch.setattr(diarize.importlib.util, "find_spec", lambda name: None)
    return where


def test_no_model_anywhere_is_none(tmp_path: Path, packaged: Path) -> None:
    assert diarize.find_weights(tmp_path / "data") is None
    assert diarize.find_weights(None) is None


def test_data_dir_model_is_found(tmp_path: Path, packaged: Path) -> None:
    data = tmp_path / "data"
    npz = _model(data / "models" / diarize.NPZ_NAME)
    assert diarize.find_weights(data) == npz


def test_packaged_model_is_found(tmp_path: Path, packaged: Path) -> None:
    npz = _model(packaged / diarize.NPZ_NAME)
    assert diarize.find_weights(tmp_path / "data") == npz
    assert diarize.find_weights(None) == npz


def test_data_dir_model_wins_over_the_packaged_one(tmp_path: Path, packaged: Path) -> None:
    _model(packaged / diarize.NPZ_NAME)
    mine = _model(tmp_path / "data" / "models" / diarize.NPZ_NAME)
    assert diarize.find_weights(tmp_path / "data") == mine


def test_packaged_model_loads(tmp_path: Path, packaged: Path) -> None:
    if not NPZ.is_file():
        pytest.fail("speaker model missing: run `make setup` (scripts/bootstrap.sh)")
    packaged.mkdir(parents=True)
    (packaged / diarize.NPZ_NAME).write_bytes(NPZ.read_bytes())
    encoder = diarize.get_encoder(tmp_path / "data")
    assert encoder.linear_w.shape[1] == 256


def test_dockerfile_copies_the_model_where_the_app_looks() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copy = re.search(r"^COPY\s+(?:--\S+\s+)*dist/wheelhouse/models/(\S+)\s+(\S+)$", text, re.M)
    assert copy, "the Dockerfile does not copy the speaker model from the wheelhouse"
    assert copy.group(1) == diarize.NPZ_NAME
    assert Path(copy.group(2).rstrip("/")) in diarize.PACKAGED_MODEL_DIRS
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "!dist/wheelhouse/" in ignore


def test_dist_builds_the_model_into_the_wheelhouse() -> None:
    text = (ROOT / "scripts" / "dist.sh").read_text()
    assert "appliance.core.diarize" in text
    assert f"models/{diarize.NPZ_NAME}" in text
    # its checksum is recorded with the wheels'
    sums = next(line for line in text.splitlines() if ">SHA256SUMS" in line)
    assert "models/" in sums


def test_install_model_dirs_follow_the_virtual_environment() -> None:
    default = Path("/opt/whisper-appliance/models")
    assert diarize._install_model_dirs(Path("/opt/whisper-appliance/venv")) == (default,)
    assert diarize._install_model_dirs(Path("/opt/whisper-appliance/releases/1.2/venv")) == (
        default,
    )
    for prefix in ("/srv/wa/releases/1.2/venv", "/srv/wa/current/venv"):
        assert diarize._install_model_dirs(Path(prefix)) == (Path("/srv/wa/models"), default)


def test_role_installs_the_model_beside_the_releases() -> None:
    tasks = yaml.safe_load(
        (ROOT / "roles" / "whisper_appliance" / "tasks" / "install.yml").read_text()
    )
    task = next(
        t for t in tasks if "speaker model" in t["name"].lower() and "ansible.builtin.copy" in t
    )
    copy = task["ansible.builtin.copy"]
    assert copy["src"] == "{{ __whisper_appliance_wheelhouse }}/models/" + diarize.NPZ_NAME
    # the role's home, which _install_model_dirs finds above releases/<version>/venv
    assert copy["dest"] == "{{ whisper_appliance_home }}/models/" + diarize.NPZ_NAME
    assert (copy["owner"], copy["group"], copy["mode"]) == ("root", "root", "0644")
    folder = next(
        t["ansible.builtin.file"]
        for t in tasks
        if "ansible.builtin.file" in t
        and t["ansible.builtin.file"].get("path") == "{{ whisper_appliance_home }}/models"
    )
    assert (folder["state"], folder["owner"], folder["mode"]) == ("directory", "root", "0755")
    # the release install puts the venv where _install_model_dirs looks above it
    text = (ROOT / "roles" / "whisper_appliance" / "tasks" / "install.yml").read_text()
    assert "{{ whisper_appliance_home }}/releases/{{ __whisper_appliance_release }}" in text
    assert "{{ __whisper_appliance_release_dir }}/venv" in text


def test_ct_template_keeps_the_model() -> None:
    """The CT template empties the data dir (scripts/image/strip-rootfs.sh): the model must
    not be there, and its folder must not be emptied."""
    strip = (ROOT / "scripts" / "image" / "strip-rootfs.sh").read_text()
    assert "/opt/whisper-appliance" not in strip
