"""whisper_appliance_release_keys: anything but PEM public keys (or files holding them) stops
the role with a clear message before a key file is written, and a private key given by
mistake never appears in the output. (Installing real keys: the molecule default scenario.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.ansible.test_roles import _run_play, _run_role


def _run_key_tasks(tmp_path: Path, keys: list[str]) -> str:
    """Only the role's update.yml, with the keys given, against a config dir in tmp_path."""
    config_dir = tmp_path / "etc"
    result = _run_play(
        tmp_path,
        {
            "tasks": [
                {
                    "ansible.builtin.include_role": {
                        "name": "whisper_appliance",
                        "tasks_from": "update",
                    },
                    "vars": {
                        "whisper_appliance_release_keys": keys,
                        "whisper_appliance_config_dir": str(config_dir),
                    },
                }
            ]
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert not config_dir.exists(), "a key file was written for bad input"
    return output


def _private_pem() -> str:
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


@pytest.mark.parametrize(
    "key",
    [
        "",  # empty
        "/nonexistent/release.pub",  # a missing file
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",  # not a public key
        "$(touch /tmp/pwned).pub",  # hostile: a path is only ever read, never run
    ],
)
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    output = _run_key_tasks(tmp_path, [key])
    assert "is not a PEM public key" in output, output
    assert not Path("/tmp/pwned").exists()  # the hostile value never ran


def test_a_file_without_a_key_is_refused(tmp_path: Path) -> None:
    not_a_key = tmp_path / "release.pub"
    not_a_key.write_text("hello\n")
    output = _run_key_tasks(tmp_path, [str(not_a_key)])
    assert f"[0] ({not_a_key}) is not a PEM public key" in output, output


def test_a_private_key_is_refused_and_not_shown(tmp_path: Path) -> None:
    pem = _private_pem()
    output = _run_key_tasks(tmp_path, [pem])
    assert "never the private key" in output, output
    body = pem.splitlines()[1]
    assert body not in output, "the private key was echoed"


def test_a_key_list_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    result = _run_role(tmp_path, "whisper_appliance", {"whisper_appliance_release_keys": {"a": 1}})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "whisper_appliance_release_keys" in output
    assert "Validation of arguments failed" in output, output
