"""Signed release artifacts: real Ed25519 keys made here, real tarballs, real verification."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.system.update import release
from appliance.system.update.release import (
    BUNDLE_SUFFIX,
    MANIFEST,
    SIGNATURE,
    Manifest,
    ReleaseError,
    build_release,
    fetch_verified,
    generate_keypair,
    load_trusted_keys,
    unpack_wheelhouse,
)
from tests.conftest import serve_directory

# --- helpers shared with test_updater.py ----------------------------------------------------
STANDIN = '''\
"""Stand-in for the appliance service, built into a wheel by tests/test_release.py."""
import json, os, sqlite3, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
BROKEN = {broken!r}
TEXT = "And so my fellow Americans, ask not what your country can do for you."


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            status = "unavailable" if BROKEN else "ok"
            self._send(503 if BROKEN else 200, {{"status": status, "version": VERSION}})
        else:
            self._send(404, {{}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/transcribe" and b"RIFF" in body and b"WAVE" in body:
            self._send(200, {{"text": TEXT}})
        else:
            self._send(400, {{"error": "no audio"}})

    def log_message(self, *args):
        pass


def main():
    if sys.argv[1:] == ["--version"]:
        print(VERSION)
        return
    # like a real release's schema migration: it writes into the database at start
    db = sqlite3.connect(os.path.join(os.environ["DATA_DIR"], "appliance.db"))
    db.execute("CREATE TABLE IF NOT EXISTS standin_runs (version TEXT)")
    db.execute("INSERT INTO standin_runs VALUES (?)", (VERSION,))
    db.commit()
    db.close()
    port = int(os.environ["HTTPS_PORT"])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_standin_wheel(directory: Path, version: str, *, broken: bool = False) -> Path:
    """A real, installable `whisper-appliance` wheel whose service is the stand-in above."""
    dist_info = f"whisper_appliance-{version}.dist-info"
    files = {
        "wa_standin/__init__.py": STANDIN.format(version=version, broken=broken).encode(),
        "wa_standin/__main__.py": b"from wa_standin import main\nmain()\n",
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: whisper-appliance\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": (
            b"[console_scripts]\nwhisper-appliance = wa_standin:main\n"
        ),
        f"{dist_info}/top_level.txt": b"wa_standin\n",
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"whisper_appliance-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_wheelhouse(directory: Path, version: str, *, broken: bool = False) -> Path:
    """A wheelhouse as `make dist` lays it out: wheels, VERSION, PYTHON, SHA256SUMS."""
    make_standin_wheel(directory, version, broken=broken)
    (directory / "VERSION").write_text(version + "\n")
    (directory / "PYTHON").write_text("{}.{}\n".format(*sys.version_info[:2]))
    sums = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(directory.glob("*.whl"))
    ]
    (directory / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return directory


def make_keys(directory: Path, name: str = "release") -> tuple[Path, Path]:
    """(private key, directory of trusted public keys holding its .pub)."""
    private = directory / f"{name}.pem"
    trusted = directory / f"{name}-trusted"
    generate_keypair(private, trusted / f"{name}.pub")
    return private, trusted


# --- tests ---------------------------------------------------------------------------------
@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    return make_wheelhouse(tmp_path / "wheelhouse", "1.2.0")


def test_keygen_writes_a_private_key_only_root_can_read_and_never_overwrites(
    tmp_path: Path,
) -> None:
    private, trusted = make_keys(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in (trusted / "release.pub").read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(private, tmp_path / "other.pub")


def test_build_and_verify_a_release_directory(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path
) -> None:
    private, trusted = keys
    out = build_release(wheelhouse, tmp_path / "rel", private, min_from_version="1.0.0")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == "1.2.0"
    assert manifest["min_from_version"] == "1.0.0"
    assert manifest["artifact"] == "whisper-appliance-1.2.0.tar"
    tarball = out / manifest["artifact"]
    assert manifest["sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    verified = fetch_verified(str(out), tmp_path / "staging", load_trusted_keys(trusted))
    assert verified.manifest.version == "1.2.0"
    assert verified.tarball.read_bytes() == tarball.read_bytes()
    names = unpack_wheelhouse(verified.tarball, tmp_path / "unpacked")
    assert sorted(names) == sorted(p.name for p in wheelhouse.iterdir())


def test_a_bundle_verifies_from_its_path_and_from_an_upload_directory(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path
) -> None:
    private, trusted = keys
    bundle = build_release(wheelhouse, tmp_path / "upload", private, bundle=True)
    assert bundle.name == f"whisper-appliance-1.2.0{BUNDLE_SUFFIX}"
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]
    for source in (bundle, bundle.parent):
        rel = fetch_verified(str(source), tmp_path / "s", load_trusted_keys(trusted))
        assert rel.manifest.version == "1.2.0"


def test_a_signature_by_an_untrusted_key_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path
) -> None:
    _, trusted = keys
    evil, _ = make_keys(tmp_path / "evil", "evil")
    out = build_release(wheelhouse, tmp_path / "rel", evil)
    staging = tmp_path / "staging"
    with pytest.raises(ReleaseError, match="bad signature"):
        fetch_verified(str(out), staging, load_trusted_keys(trusted))
    assert list(staging.iterdir()) == []  # refused before the artifact was even read


def test_an_edited_manifest_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path
) -> None:
    private, trusted = keys
    out = build_release(wheelhouse, tmp_path / "rel", private)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["version"] = "9.9.9"
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ReleaseError, match="bad signature"):
        fetch_verified(str(out), tmp_path / "s", load_trusted_keys(trusted))


@pytest.mark.parametrize("how", ["flip", "append"])
def test_a_tampered_tarball_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path, how: str
) -> None:
    private, trusted = keys
    out = build_release(wheelhouse, tmp_path / "rel", private)
    tarball = out / "whisper-appliance-1.2.0.tar"
    data = bytearray(tarball.read_bytes())
    if how == "flip":
        data[700] ^= 0xFF
    else:
        data += b"\0" * 512
    tarball.write_bytes(bytes(data))
    staging = tmp_path / "staging"
    with pytest.raises(ReleaseError, match="checksum mismatch"):
        fetch_verified(str(out), staging, load_trusted_keys(trusted))
    assert not (staging / tarball.name).exists()


def test_no_trusted_keys_means_nothing_is_trusted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReleaseError, match="no trusted release keys"):
        load_trusted_keys(tmp_path / "empty")


@pytest.mark.parametrize(
    "member",
    [
        ("../evil.whl", tarfile.REGTYPE),
        ("sub/x.whl", tarfile.REGTYPE),
        ("link.whl", tarfile.SYMTYPE),
        ("/etc/passwd", tarfile.REGTYPE),
    ],
)
def test_unpack_refuses_anything_but_flat_regular_files(
    tmp_path: Path, member: tuple[str, bytes]
) -> None:
    tarball = tmp_path / "w.tar"
    with tarfile.open(tarball, "w") as tar:
        ok = tarfile.TarInfo("whisper_appliance-1.0-py3-none-any.whl")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        bad = tarfile.TarInfo(member[0])
        bad.type = member[1]
        bad.linkname = "/etc/passwd" if member[1] == tarfile.SYMTYPE else ""
        tar.addfile(bad, io.BytesIO(b""))
    with pytest.raises(ReleaseError, match="unexpected entry"):
        unpack_wheelhouse(tarball, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_manifest_validation_rejects_unsafe_values() -> None:
    good = {
        "format": 1,
        "name": "whisper-appliance",
        "version": "1.0.0",
        "created": "",
        "artifact": "whisper-appliance-1.0.0.tar",
        "sha256": "0" * 64,
        "size": 10,
    }
    assert Manifest.from_json(json.dumps(good).encode()).version == "1.0.0"
    for key, value in [
        ("version", "../../etc"),
        ("artifact", "../x.tar"),
        ("sha256", "abc"),
        ("size", -1),
        ("name", "other"),
    ]:
        with pytest.raises(ReleaseError):
            Manifest.from_json(json.dumps({**good, key: value}).encode())


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as url:
        yield url, root


def test_verify_from_a_url(
    tmp_path: Path, keys: tuple[Path, Path], wheelhouse: Path, http_dir: tuple[str, Path]
) -> None:
    private, trusted = keys
    url, root = http_dir
    build_release(wheelhouse, root / "releases", private)
    build_release(wheelhouse, root / "bundles", private, bundle=True)
    trusted_keys = load_trusted_keys(trusted)
    for source in (
        f"{url}/releases/",
        f"{url}/releases/{MANIFEST}",
        f"{url}/bundles/whisper-appliance-1.2.0{BUNDLE_SUFFIX}",
    ):
        rel = fetch_verified(source, tmp_path / "s", trusted_keys)
        assert rel.manifest.version == "1.2.0", source
    (root / "releases" / SIGNATURE).write_text(base64.b64encode(b"\0" * 64).decode() + "\n")
    with pytest.raises(ReleaseError, match="bad signature"):
        fetch_verified(f"{url}/releases/", tmp_path / "s", trusted_keys)


def test_an_oversized_bundle_download_stops_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_dir: tuple[str, Path]
) -> None:
    url, root = http_dir
    (root / f"huge{BUNDLE_SUFFIX}").write_bytes(b"\0" * 4 * 1024 * 1024)
    monkeypatch.setattr(release, "MAX_BUNDLE", 3 * 1024 * 1024)
    with pytest.raises(ReleaseError, match="larger than"):
        fetch_verified(f"{url}/huge{BUNDLE_SUFFIX}", tmp_path / "s", [])
    assert not list((tmp_path / "s").rglob(f"*{BUNDLE_SUFFIX}"))  # nothing left on disk


def test_command_line_keygen_build_verify(
    tmp_path: Path, wheelhouse: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "k.pem"
    assert release.main(["keygen", str(private), str(tmp_path / "keys" / "k.pub")]) == 0
    out = tmp_path / "out"
    assert release.main(["build", "--wheelhouse", str(wheelhouse), "--out", str(out),
                         "--key", str(private), "--notes", "Faster"]) == 0  # fmt: skip
    assert json.loads((out / MANIFEST).read_text())["notes"] == "Faster"
    assert release.main(["verify", str(out), "--keys", str(tmp_path / "keys")]) == 0
    assert "ok: whisper-appliance 1.2.0" in capsys.readouterr().out
    assert release.main(["verify", str(out), "--keys", str(tmp_path / "nokeys")]) == 1
