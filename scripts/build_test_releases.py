"""Build the signed releases the molecule update test applies to a real appliance.

Into OUT (default molecule/.cache/releases/):
- keys/trusted.pem + trusted.pub: the signing key the role installs as trusted;
  keys/untrusted.pem + untrusted.pub: a key the appliance does not know;
- next/: release N+1 as a `.release.tar` bundle (the admin panel's upload), the same source
  as the wheelhouse with the version bumped;
- broken/: release N+2 as a directory (the admin panel's URL source): installs and starts, but
  GET /health answers 503 for ever, so the updater must roll back by itself;
- untrusted/: release N+3, a complete release signed with the untrusted key (refused);
- releases.json: versions and paths, read by the test.

N is the wheelhouse's VERSION; the versions above it are N+update1..3 (a local version label,
which sorts above N in appliance.system.update.version.version_key). Only the appliance wheel
is rebuilt per release; the ~50 dependency wheels of the wheelhouse are hard-linked, never
downloaded again. Nothing is rebuilt while the source, the wheelhouse and this script are unchanged.

usage: python scripts/build_test_releases.py [--wheelhouse dist/wheelhouse] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from appliance.system.update.release import NAME, build_release, generate_keypair
from appliance.system.update.version import version_key

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ("pyproject.toml", "README.md", "appliance")
HEALTH = ("appliance/web/api/system.py", "ok = all(checks.values())")
BROKEN = "ok = False  # a deliberately broken test release: it starts, it is never healthy"


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCE:
        path = ROOT / name
        found = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in found if p.is_file() and "__pycache__" not in p.parts]
    return files


def stamp(wheelhouse: Path) -> str:
    """Digest of everything a release is made of: rebuild when any of it changes."""
    digest = hashlib.sha256()
    for path in [*source_files(), Path(__file__).resolve(), wheelhouse / "SHA256SUMS"]:
        digest.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def bumped(base: str, n: int) -> str:
    candidate = f"{base}{'.' if '+' in base else '+'}update{n}"
    if version_key(candidate) <= version_key(base):
        sys.exit(f"{candidate} does not sort above {base}")
    return candidate


def build_wheel(version_text: str, dest: Path, work: Path, *, broken: bool = False) -> Path:
    """The appliance wheel of a copy of the source with `version_text` (and a broken /health)."""
    dest, work = dest.resolve(), work.resolve()
    src = work / f"src-{version_text}"
    for path in source_files():
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    pyproject = src / "pyproject.toml"
    text, count = re.subn(
        r'(?m)^version = "[^"]*"$', f'version = "{version_text}"', pyproject.read_text(), count=1
    )
    if count != 1:
        sys.exit('pyproject.toml has no `version = "..."` line to bump')
    pyproject.write_text(text)
    if broken:
        module = src / HEALTH[0]
        code = module.read_text()
        if code.count(HEALTH[1]) != 1:
            sys.exit(f"{HEALTH[0]} no longer has `{HEALTH[1]}`: update this script's patch")
        module.write_text(code.replace(HEALTH[1], BROKEN))
    # The venv's setuptools when new enough (no download); else pip's isolated build.
    isolation = ["--no-build-isolation"] if setuptools_ok() else []
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
            *("--disable-pip-version-check", *isolation, "-w", str(dest), str(src)),
        ],
        check=True,
        cwd=work,
    )
    wheels = list(dest.glob("whisper_appliance-*.whl"))
    if len(wheels) != 1 or f"-{version_text}-" not in wheels[0].name:
        sys.exit(f"expected one whisper_appliance {version_text} wheel in {dest}, got {wheels}")
    return wheels[0]


def setuptools_ok() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 68
    except (PackageNotFoundError, ValueError):
        return False


def link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copy2(src, dest)


def wheelhouse_with(base: Path, wheel: Path, version_text: str, dest: Path) -> Path:
    """dest/: the base wheelhouse's dependency wheels (hard links) plus the given appliance
    wheel, with VERSION, PYTHON and SHA256SUMS rewritten to match."""
    dest.mkdir(parents=True)
    sums = [
        line
        for line in (base / "SHA256SUMS").read_text().splitlines()
        if line.strip() and not line.split()[-1].startswith("whisper_appliance-")
    ]
    for path in base.glob("*.whl"):
        if not path.name.startswith("whisper_appliance-"):
            link(path, dest / path.name)
    shutil.copy2(wheel, dest / wheel.name)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    sums.append(f"{digest}  {wheel.name}")
    (dest / "SHA256SUMS").write_text("\n".join(sorted(sums, key=lambda s: s.split()[-1])) + "\n")
    (dest / "VERSION").write_text(version_text + "\n")
    shutil.copy2(base / "PYTHON", dest / "PYTHON")
    if (base / "requirements.lock").is_file():  # the hashed pins the updater installs first
        link(base / "requirements.lock", dest / "requirements.lock")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "dist" / "wheelhouse")
    parser.add_argument("--out", type=Path, default=ROOT / "molecule" / ".cache" / "releases")
    args = parser.parse_args(argv)
    wheelhouse: Path = args.wheelhouse.resolve()
    out: Path = args.out.resolve()
    for needed in ("VERSION", "PYTHON", "SHA256SUMS"):
        if not (wheelhouse / needed).is_file():
            sys.exit(f"{wheelhouse}/{needed} is missing: run `make dist` first")
    started = time.monotonic()
    current = stamp(wheelhouse)
    index = out / "releases.json"
    if index.is_file() and json.loads(index.read_text()).get("stamp") == current:
        print(f"test releases in {out}: up to date")
        return 0

    keys = out / "keys"
    for name in ("trusted", "untrusted"):
        if not (keys / f"{name}.pem").is_file():
            generate_keypair(keys / f"{name}.pem", keys / f"{name}.pub")
    base = (wheelhouse / "VERSION").read_text().strip()
    plan = {  # name: (version, broken, signing key, bundle)
        "next": (bumped(base, 1), False, "trusted", True),
        "broken": (bumped(base, 2), True, "trusted", False),
        "untrusted": (bumped(base, 3), False, "untrusted", False),
    }
    index.unlink(missing_ok=True)
    for old in out.iterdir():  # releases of an earlier build (the keys stay)
        if old.is_dir() and old.name != "keys":
            shutil.rmtree(old)
    result: dict[str, object] = {"base": base, "key": str(keys / "trusted.pub")}
    with tempfile.TemporaryDirectory(prefix="test-releases-", dir=out) as tmp:
        work = Path(tmp)
        for name, (ver, broken, key, bundle) in plan.items():
            wheel = build_wheel(ver, work / f"wheel-{name}", work, broken=broken)
            house = wheelhouse_with(wheelhouse, wheel, ver, work / f"wheelhouse-{name}")
            built = build_release(
                house,
                out / name,
                keys / f"{key}.pem",
                version=ver,
                notes=f"molecule test release ({name})",
                bundle=bundle,
            )
            result[name] = {"version": ver, "path": str(built), "bundle": bundle}
            print(f"  {name}: {NAME} {ver} -> {built}")
    result["stamp"] = current
    index.write_text(json.dumps(result, indent=2) + "\n")
    print(f"test releases in {out}: built in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
