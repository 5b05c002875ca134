"""Signed release artifacts: build them, fetch them, and verify them before anything changes.

A release is three files, served from a directory or URL (the update source) or packed into one
`whisper-appliance-<version>.release.tar` bundle for an air-gapped upload:

- `whisper-appliance-<version>.tar`: the wheelhouse (`make dist`: the appliance wheel plus every
  locked runtime wheel, the bundled models included) as a flat, uncompressed tarball;
- `manifest.json`: `{format, name, version, created, artifact, sha256, size, python,
  min_from_version?, notes?}` — the same file the admin panel's update check reads;
- `manifest.json.sig`: the base64 Ed25519 signature over the exact bytes of `manifest.json`.

The appliance trusts only the public keys (`*.pub`, PEM) in its key directory. Verification
order: signature over the manifest first (nothing else is read before it checks out), then the
tarball is copied into a private staging directory while its SHA-256 is computed, so what gets
unpacked is exactly what was checked (an unprivileged writer of the upload directory cannot swap
it afterwards). Only flat, plain-named regular files are unpacked.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.exceptions import ApplianceError
from appliance.system.update.spool import BUNDLE_SUFFIX, MAX_ARTIFACT
from appliance.system.update.version import VersionError, release_name_ok, version_key

NAME = "whisper-appliance"
FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
DEFAULT_KEY_DIR = Path("/etc/whisper-appliance/release-keys")
MAX_SMALL = 1024 * 1024  # manifest and signature
MAX_BUNDLE = MAX_ARTIFACT + 4 * MAX_SMALL  # the artifact, manifest, signature, tar headers
_CHUNK = 1024 * 1024
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(ApplianceError):
    """The release is unusable: bad signature, checksum, manifest or archive."""

    status, code = 400, "bad_release"


def _check_version(text: object) -> str:
    """A release version: PEP 440 (pip installs it) and a safe directory name."""
    if not release_name_ok(text):
        raise ReleaseError(f"not a usable version number: {str(text)[:60]!r}")
    assert isinstance(text, str)
    try:
        version_key(text)
    except VersionError as exc:
        raise ReleaseError(str(exc)) from None
    return text


@dataclass(frozen=True)
class Manifest:
    version: str
    created: str
    artifact: str
    sha256: str
    size: int
    python: str = "3.11"
    min_from_version: str | None = None
    notes: str | None = None
    name: str = NAME
    format: int = FORMAT

    def to_json(self) -> bytes:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and validate (call only on bytes whose signature was checked)."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ReleaseError(f"the manifest is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ReleaseError("the manifest is not a JSON object")
        if data.get("format") != FORMAT or data.get("name") != NAME:
            raise ReleaseError(
                f"not a {NAME} release manifest of format {FORMAT}: "
                f"name={data.get('name')!r}, format={data.get('format')!r}"
            )
        artifact = data.get("artifact")
        if not isinstance(artifact, str) or not _FILE_NAME.match(artifact):
            raise ReleaseError(f"bad artifact name in the manifest: {artifact!r}")
        sha = data.get("sha256")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise ReleaseError("bad sha256 in the manifest")
        size = data.get("size")
        if not isinstance(size, int) or not 0 < size <= MAX_ARTIFACT:
            raise ReleaseError(f"bad artifact size in the manifest: {size!r}")
        min_from = data.get("min_from_version")
        notes = data.get("notes")
        python = data.get("python", "3.11")
        if not isinstance(python, str) or not re.fullmatch(r"3\.\d+", python):
            raise ReleaseError(f"bad python version in the manifest: {python!r}")
        return cls(
            version=_check_version(data.get("version")),
            created=str(data.get("created", "")),
            artifact=artifact,
            sha256=sha,
            size=size,
            python=python,
            min_from_version=None if min_from is None else _check_version(min_from),
            notes=notes if isinstance(notes, str) else None,
        )


# --- keys -------------------------------------------------------------------------------------
def key_id(public: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 signing key (PEM, 0600, never overwritten) and its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key()
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ReleaseError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path} is not an Ed25519 public key")
    return key


def load_trusted_keys(key_dir: Path) -> list[Ed25519PublicKey]:
    """Every `*.pub` in the key directory; none at all is an error (nothing can be trusted)."""
    paths = sorted(key_dir.glob("*.pub")) if key_dir.is_dir() else []
    keys = [load_public_key(p) for p in paths]
    if not keys:
        raise ReleaseError(f"no trusted release keys (*.pub) in {key_dir}")
    return keys


def verify_signature(
    manifest_raw: bytes, signature_text: bytes, keys: Sequence[Ed25519PublicKey]
) -> str:
    """The id of the trusted key that signed the manifest, or ReleaseError."""
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except ValueError:
        raise ReleaseError("the signature file is not base64") from None
    for key in keys:
        try:
            key.verify(signature, manifest_raw)
        except InvalidSignature:
            continue
        return key_id(key)
    raise ReleaseError("bad signature: the manifest is not signed by a trusted release key")


# --- building ---------------------------------------------------------------------------------
def _wheelhouse_files(wheelhouse: Path) -> list[Path]:
    files = sorted(p for p in wheelhouse.iterdir() if p.is_file())
    if not any(p.suffix == ".whl" and p.name.startswith("whisper_appliance-") for p in files):
        raise ReleaseError(f"{wheelhouse} holds no whisper_appliance wheel (run `make dist`)")
    for p in files:
        if not _FILE_NAME.match(p.name):
            raise ReleaseError(f"unexpected file name in the wheelhouse: {p.name!r}")
    return files


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info


def build_release(
    wheelhouse: Path,
    out_dir: Path,
    private_key: Path,
    *,
    version: str | None = None,
    min_from_version: str | None = None,
    notes: str | None = None,
    bundle: bool = False,
) -> Path:
    """Pack, describe and sign a wheelhouse. Returns the release directory (or the bundle)."""
    files = _wheelhouse_files(wheelhouse)
    if version is None:
        version_file = wheelhouse / "VERSION"
        if not version_file.is_file():
            raise ReleaseError(f"{wheelhouse}/VERSION is missing: pass --version")
        version = version_file.read_text().strip()
    version = _check_version(version)
    python_file = wheelhouse / "PYTHON"
    python = python_file.read_text().strip() if python_file.is_file() else "3.11"
    key = load_private_key(private_key)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"{NAME}-{version}.tar"
    with tarfile.open(artifact, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            tar.add(path, arcname=path.name, recursive=False, filter=_reset)
    manifest = Manifest(
        version=version,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        artifact=artifact.name,
        sha256=sha256_file(artifact),
        size=artifact.stat().st_size,
        python=python,
        min_from_version=None if min_from_version is None else _check_version(min_from_version),
        notes=notes,
    )
    raw = manifest.to_json()
    (out_dir / MANIFEST).write_bytes(raw)
    (out_dir / SIGNATURE).write_bytes(base64.b64encode(key.sign(raw)) + b"\n")
    if not bundle:
        return out_dir
    target = out_dir / f"{NAME}-{version}{BUNDLE_SUFFIX}"
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in (MANIFEST, SIGNATURE, artifact.name):  # manifest first: verified first
            tar.add(out_dir / name, arcname=name, recursive=False, filter=_reset)
    for name in (MANIFEST, SIGNATURE, artifact.name):
        (out_dir / name).unlink()
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- fetching and verifying -------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose signature and checksum were checked; `tarball` lies in staging."""

    manifest: Manifest
    manifest_raw: bytes
    tarball: Path
    key_id: str
    source: str


def _copy_limited(src: IO[bytes], dest: Path, limit: int) -> str:
    digest = hashlib.sha256()
    written = 0
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise ReleaseError(f"checksum mismatch: the artifact is larger than {limit} bytes")
            digest.update(chunk)
            out.write(chunk)
    if written != limit:
        raise ReleaseError(
            f"checksum mismatch: the artifact has {written} bytes, the manifest says {limit}"
        )
    return digest.hexdigest()


def _read_small(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_SMALL + 1)
    if len(data) > MAX_SMALL:
        raise ReleaseError(f"{path.name} is larger than {MAX_SMALL} bytes")
    return data


class _Source:
    """Where the three files come from: a directory, a bundle or a URL."""

    def small(self, name: str) -> bytes:
        raise NotImplementedError

    def copy_artifact(self, name: str, dest: Path, size: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _DirSource(_Source):
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def small(self, name: str) -> bytes:
        path = self.dir / name
        if not path.is_file():
            raise ReleaseError(f"{path} is missing")
        return _read_small(path)

    def copy_artifact(self, name: str, dest: Path, size: int) -> str:
        path = self.dir / name
        if not path.is_file():
            raise ReleaseError(f"{path} is missing")
        with path.open("rb") as f:
            return _copy_limited(f, dest, size)


class _BundleSource(_Source):
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            raise ReleaseError(f"{path} is not a release bundle: {exc}") from None

    def _member(self, name: str) -> IO[bytes]:
        try:
            info = self.tar.getmember(name)
        except KeyError:
            raise ReleaseError(f"the bundle has no {name}") from None
        f = self.tar.extractfile(info) if info.isreg() else None
        if f is None:
            raise ReleaseError(f"{name} in the bundle is not a regular file")
        return f

    def small(self, name: str) -> bytes:
        data = self._member(name).read(MAX_SMALL + 1)
        if len(data) > MAX_SMALL:
            raise ReleaseError(f"{name} is larger than {MAX_SMALL} bytes")
        return data

    def copy_artifact(self, name: str, dest: Path, size: int) -> str:
        return _copy_limited(self._member(name), dest, size)

    def close(self) -> None:
        self.tar.close()


class _UrlSource(_Source):
    def __init__(self, base: str) -> None:
        self.base = base if base.endswith("/") else base + "/"
        self.client = httpx.Client(timeout=60, follow_redirects=True)

    def _stream(self, name: str, limit: int, out: IO[bytes] | None) -> tuple[bytes, str, int]:
        digest = hashlib.sha256()
        buf = bytearray()
        got = 0
        with self.client.stream("GET", self.base + name) as response:
            if response.status_code != 200:
                raise ReleaseError(f"{self.base + name} answered HTTP {response.status_code}")
            for chunk in response.iter_bytes(_CHUNK):
                got += len(chunk)
                if got > limit:
                    raise ReleaseError(f"{name} is larger than {limit} bytes")
                digest.update(chunk)
                if out is None:
                    buf.extend(chunk)
                else:
                    out.write(chunk)
        return bytes(buf), digest.hexdigest(), got

    def small(self, name: str) -> bytes:
        return self._stream(name, MAX_SMALL, None)[0]

    def copy_artifact(self, name: str, dest: Path, size: int) -> str:
        with dest.open("wb") as out:
            _, digest, got = self._stream(name, size, out)
        if got != size:
            raise ReleaseError(
                f"checksum mismatch: the artifact has {got} bytes, the manifest says {size}"
            )
        return digest

    def close(self) -> None:
        self.client.close()


def _open_source(source: str, staging: Path) -> _Source:
    if re.match(r"^https?://", source):
        if source.endswith(BUNDLE_SUFFIX):
            bundle = staging / "download" / source.rsplit("/", 1)[-1]
            bundle.parent.mkdir(parents=True, exist_ok=True)
            with (
                httpx.Client(timeout=60, follow_redirects=True) as client,
                client.stream("GET", source) as response,
                bundle.open("wb") as out,
            ):
                if response.status_code != 200:
                    raise ReleaseError(f"{source} answered HTTP {response.status_code}")
                got = 0
                for chunk in response.iter_bytes(_CHUNK):
                    got += len(chunk)
                    if got > MAX_BUNDLE:  # a hostile or broken server must not fill the disk
                        out.close()
                        bundle.unlink(missing_ok=True)
                        raise ReleaseError(f"{source} is larger than {MAX_BUNDLE} bytes")
                    out.write(chunk)
            return _BundleSource(bundle)
        if source.endswith("/" + MANIFEST):
            source = source[: -len(MANIFEST)]
        return _UrlSource(source)
    path = Path(source).expanduser()
    if path.is_file() and path.name == MANIFEST:
        return _DirSource(path.parent)
    if path.is_file():
        return _BundleSource(path)
    if path.is_dir():
        if (path / MANIFEST).exists():
            return _DirSource(path)
        bundles = sorted(path.glob("*" + BUNDLE_SUFFIX), key=lambda p: p.stat().st_mtime)
        if bundles:  # an upload directory: the newest bundle in it
            return _BundleSource(bundles[-1])
        raise ReleaseError(f"{path} holds neither {MANIFEST} nor a *{BUNDLE_SUFFIX} bundle")
    raise ReleaseError(f"no release at {source}")


def fetch_verified(source: str, staging: Path, keys: Sequence[Ed25519PublicKey]) -> VerifiedRelease:
    """Signature first, then the artifact copied into `staging` and its SHA-256 compared."""
    staging.mkdir(parents=True, exist_ok=True)
    src = _open_source(source, staging)
    try:
        raw = src.small(MANIFEST)
        signer = verify_signature(raw, src.small(SIGNATURE), keys)
        manifest = Manifest.from_json(raw)
        tarball = staging / manifest.artifact
        try:
            digest = src.copy_artifact(manifest.artifact, tarball, manifest.size)
        except BaseException:
            tarball.unlink(missing_ok=True)
            raise
    finally:
        src.close()
    if digest != manifest.sha256:
        tarball.unlink(missing_ok=True)
        raise ReleaseError(
            f"checksum mismatch: {manifest.artifact} has sha256 {digest}, "
            f"the signed manifest says {manifest.sha256}"
        )
    return VerifiedRelease(manifest, raw, tarball, signer, source)


def unpack_wheelhouse(tarball: Path, dest: Path) -> list[str]:
    """Extract the flat wheelhouse; anything but plain-named regular files is refused."""
    dest.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tarfile.open(tarball, "r:") as tar:
        members = tar.getmembers()
        for info in members:
            name = info.name.removeprefix("./")
            if info.isdir() and name in ("", "."):
                continue
            if not info.isreg() or not _FILE_NAME.match(name):
                raise ReleaseError(f"unexpected entry in the wheelhouse tarball: {info.name!r}")
        for info in members:
            name = info.name.removeprefix("./")
            if not info.isreg():
                continue
            f = tar.extractfile(info)
            assert f is not None
            with f, (dest / name).open("wb") as out:
                shutil.copyfileobj(f, out, _CHUNK)
            names.append(name)
    if not any(n.startswith("whisper_appliance-") and n.endswith(".whl") for n in names):
        raise ReleaseError("the wheelhouse tarball holds no whisper_appliance wheel")
    return names


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="staging-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.release",
        description="Make signing keys; build and verify releases.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kg = sub.add_parser(
        "keygen", help="make an Ed25519 signing key pair (keep the private key off git)"
    )
    kg.add_argument("private", type=Path, help="private key to write (PEM, 0600)")
    kg.add_argument("public", type=Path, nargs="?", help="public key (default: PRIVATE.pub)")
    bd = sub.add_parser("build", help="pack, describe and sign a wheelhouse")
    bd.add_argument("--wheelhouse", type=Path, default=Path("dist/wheelhouse"))
    bd.add_argument("--out", type=Path, default=Path("dist/release"))
    bd.add_argument("--key", type=Path, required=True, help="private signing key (PEM)")
    bd.add_argument("--version", help="default: the wheelhouse's VERSION file")
    bd.add_argument("--min-from-version", help="refuse updating from an older version")
    bd.add_argument("--notes", help="release notes shown in the admin panel")
    bd.add_argument("--bundle", action="store_true", help="one .release.tar file for uploads")
    vf = sub.add_parser("verify", help="check a release's signature and checksum")
    vf.add_argument("source", help="release directory, bundle, manifest.json or URL")
    vf.add_argument("--keys", type=Path, default=DEFAULT_KEY_DIR, help="trusted *.pub directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            public = args.public or args.private.with_name(args.private.name + ".pub")
            print(f"key {generate_keypair(args.private, public)}: {args.private}, {public}")
        elif args.command == "build":
            out = build_release(
                args.wheelhouse,
                args.out,
                args.key,
                version=args.version,
                min_from_version=args.min_from_version,
                notes=args.notes,
                bundle=args.bundle,
            )
            print(out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rel = fetch_verified(args.source, Path(tmp), load_trusted_keys(args.keys))
                print(f"ok: {NAME} {rel.manifest.version}, signed by key {rel.key_id}")
    except (ReleaseError, OSError, httpx.HTTPError) as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "Manifest",
    "ReleaseError",
    "VerifiedRelease",
    "build_release",
    "fetch_verified",
    "generate_keypair",
    "load_trusted_keys",
    "unpack_wheelhouse",
]

if __name__ == "__main__":
    raise SystemExit(main())
