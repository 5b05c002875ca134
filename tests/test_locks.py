"""Lock files pin every package with sha256 hashes, and every install from a lock checks them.

pip checks hashes for a requirements file as soon as one requirement carries any; with
`--require-hashes` a requirement without one is an error instead of a silent unhashed install.
The locks are read the way pip reads them (continuation lines, comments), the install sites
(scripts, Makefile fragments, Dockerfiles, the role) as the commands they run.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = sorted(ROOT.glob("requirements*.lock"))
# Installed into one venv (.venv, or the image's: runtime + GPU), so a package in two of them
# must be the same release.
SAME_VENV = [
    "requirements.lock",
    "requirements-dev.lock",
    "requirements-openai-whisper.lock",
    "requirements-gpu.lock",
]
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
LOCK_NAME = re.compile(r"requirements[A-Za-z0-9_.-]*\.lock")


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    hashes: frozenset[str]


def logical_lines(text: str) -> list[str]:
    """pip's reading of a requirements file: comments dropped, `\\` continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if (pending + line).strip():
            lines.append(" ".join((pending + line).split()))
        pending = ""
    assert not pending, "the file ends inside a continuation line"
    return lines


def parse_lock(text: str, name: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for line in logical_lines(text):
        spec, *options = re.split(r"\s+(?=--)", line)
        req = Requirement(spec)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{name}: {spec} is not one == pin")
        if not options:
            raise ValueError(f"{name}: {spec} has no hash")
        if bad := [o for o in options if not HASH.fullmatch(o)]:
            raise ValueError(f"{name}: {spec}: not a sha256 hash option: {bad}")
        if len(set(options)) != len(options):
            raise ValueError(f"{name}: {spec} repeats a hash")
        key = canonicalize_name(req.name)
        if key in pins:
            raise ValueError(f"{name} pins {key} twice")
        hashes = frozenset(o.split(":", 1)[1] for o in options)
        pins[key] = Pin(key, Version(specs[0].version), hashes)
    return pins


def read_lock(path: Path) -> dict[str, Pin]:
    return parse_lock(path.read_text(), path.name)


def test_the_reader_reads_continuations_and_comments() -> None:
    a, b, c = ("--hash=sha256:" + x * 64 for x in "abc")
    text = f"# head\nfoo==1.0 \\\n    {a} \\\n    {b}\n    # via bar\nBaz==2.0+cpu {c}  # why\n"
    pins = parse_lock(text, "t")
    assert pins["foo"] == Pin("foo", Version("1.0"), frozenset({"a" * 64, "b" * 64}))
    assert pins["baz"].version == Version("2.0+cpu")
    for bad in (
        "foo==1.0\n",
        f"foo>=1.0 {a}\n",
        "foo==1.0 --hash=md5:" + "a" * 32,
        f"f==1 {a}\nf==2 {b}",
    ):
        with pytest.raises(ValueError, match=r"^t[: ]"):
            parse_lock(bad, "t")


def test_there_are_the_lock_files() -> None:
    names = [p.name for p in LOCKS]
    assert set(SAME_VENV) <= set(names), names


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_pin_carries_sha256_hashes(lock: Path) -> None:
    pins = read_lock(lock)
    assert pins, f"{lock.name} pins nothing"
    # every line but comments belongs to a pin: nothing pip would read as an option or a file
    for line in logical_lines(lock.read_text()):
        assert re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[^]]*\])?==", line), line


def test_the_generated_locks_say_which_pythons_their_hashes_cover() -> None:
    """scripts/lock.sh writes the note; scripts/dist.sh refuses a DIST_PYTHON not in it."""
    notes = {}
    for name in SAME_VENV:
        text = (ROOT / name).read_text()
        found = re.findall(r"^# Hashes: Linux x86-64, CPython ([0-9. ]+);", text, re.M)
        assert len(found) == 1, f"{name}: one '# Hashes:' note expected, found {found}"
        notes[name] = found[0].split()
    assert notes["requirements.lock"] == ["3.11", "3.12"]  # Debian 12, and DIST_PYTHON=3.12
    assert all("3.11" in pythons for pythons in notes.values()), notes


def test_pins_installed_together_agree() -> None:
    locks = {name: read_lock(ROOT / name) for name in SAME_VENV}
    runtime, dev = locks["requirements.lock"], locks["requirements-dev.lock"]
    # one `pip install -r requirements.lock -r requirements-dev.lock`: each package once
    assert not set(runtime) & set(dev)
    seen: dict[str, tuple[str, Pin]] = {}
    for name, pins in locks.items():
        for pin in pins.values():
            if pin.name in seen:
                other_lock, other = seen[pin.name]
                assert pin.version == other.version, f"{pin.name}: {name} and {other_lock} differ"
                assert pin.hashes & other.hashes, (
                    f"{pin.name}: {name} and {other_lock} share no file"
                )
            seen[pin.name] = (name, pin)


def test_the_openai_whisper_lock_keeps_cpu_torch_and_no_triton() -> None:
    """openai-whisper's metadata asks for triton (GPU only, ~1 GB): the lock is installed
    with --no-deps and holds the CPU build of torch and what openai-whisper uses on a CPU."""
    pins = read_lock(ROOT / "requirements-openai-whisper.lock")
    assert pins["torch"].version.local == "cpu"
    assert "openai-whisper" in pins
    assert not [n for n in pins if n == "triton" or n.startswith("nvidia-")]


def test_dist_counts_pins_not_lines() -> None:
    """scripts/dist.sh checks it has one wheel per pin; hash lines are not pins."""
    script = (ROOT / "scripts" / "dist.sh").read_text()
    count = re.search(r"^expected=\$\((.*)\)", script, re.M)
    assert count, "scripts/dist.sh no longer sets expected=$(...)"
    out = subprocess.run(
        ["bash", "-c", count.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == len(read_lock(ROOT / "requirements.lock"))


@pytest.mark.parametrize(
    ("python", "ok"), [("3.11", True), ("3.12", True), ("3.13", False), ("3.1", False)]
)
def test_dist_refuses_a_python_the_lock_has_no_hashes_for(python: str, ok: bool) -> None:
    script = (ROOT / "scripts" / "dist.sh").read_text()
    check = re.search(r"^(grep -qE \"\^# Hashes: .*\" requirements\.lock)", script, re.M)
    assert check, "scripts/dist.sh no longer checks the lock's '# Hashes:' note"
    rc = subprocess.run(
        ["bash", "-c", check.group(1)], cwd=ROOT, env={"DIST_PYTHON": python}
    ).returncode
    assert (rc == 0) is ok


# --- the install sites --------------------------------------------------------------------------
def shell_commands(path: Path) -> list[str]:
    """The simple commands of a shell script, Makefile fragment or Dockerfile RUN, one a string."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    commands: list[str] = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        commands += [c.strip() for c in re.split(r";|&&|\|\||\|", line) if c.strip()]
    return commands


def pip_lock_command(words: str) -> bool:
    """pip (`pip`, `.venv/bin/pip`, `"${PIP[@]}"`, bootstrap's `pip_quiet`) on a lock file."""
    pip = re.search(r"\bpip\w*\b.*\b(install|download)\b", words, re.IGNORECASE)
    return bool(pip) and bool(LOCK_NAME.search(words))


SHELL_SITES = [
    ROOT / "Makefile",
    ROOT / "Dockerfile",
    ROOT / "Dockerfile.gpu",
    ROOT / "install.sh",
    ROOT / ".ci" / "run",
    *sorted((ROOT / "mk").glob("*.mk")),
    *sorted((ROOT / "scripts").rglob("*.sh")),
]


def test_every_install_from_a_lock_requires_hashes() -> None:
    sites: dict[str, list[str]] = {}
    for path in SHELL_SITES:
        if not path.is_file():
            continue
        for command in shell_commands(path):
            if pip_lock_command(command):
                sites.setdefault(str(path.relative_to(ROOT)), []).append(command)
                assert "--require-hashes" in command.split(), f"{path.relative_to(ROOT)}: {command}"
    # the scan finds what it is meant to find (a rename must not make it pass on nothing)
    assert len(sites.get("scripts/bootstrap.sh", [])) == 2, sites
    assert len(sites.get("Dockerfile", [])) == 1, sites
    assert len(sites.get("Dockerfile.gpu", [])) == 1, sites
    assert len(sites.get("scripts/dist.sh", [])) == 1, sites
    ow = next(c for c in sites["scripts/bootstrap.sh"] if "requirements-openai-whisper.lock" in c)
    assert "--no-deps" in ow.split()  # never triton


def role_commands(node: Any) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    if isinstance(node, list):
        for item in node:
            found += role_commands(item)
    elif isinstance(node, dict):
        command = node.get("ansible.builtin.command")
        if isinstance(command, dict) and isinstance(command.get("argv"), list):
            found.append((str(node.get("name")), [str(a) for a in command["argv"]]))
        for key in ("block", "rescue", "always"):
            found += role_commands(node.get(key, []))
    return found


def test_the_role_installs_the_wheelhouse_with_hashes_then_the_appliance_alone() -> None:
    commands = []
    for path in sorted((ROOT / "roles").rglob("tasks/*.yml")):
        commands += [
            c for c in role_commands(yaml.safe_load(path.read_text())) if "install" in c[1]
        ]
    pip = [(name, argv) for name, argv in commands if argv[0].endswith("/pip")]
    locked = [(name, argv) for name, argv in pip if any(LOCK_NAME.search(a) for a in argv)]
    assert len(locked) == 1, pip
    name, argv = locked[0]
    assert {"--require-hashes", "--no-index"} <= set(argv), name
    assert argv[argv.index("--requirement") + 1].endswith("/requirements.lock")
    # the appliance's own wheel is built by `make dist`: no hash known in advance, so it is
    # installed on its own, with nothing else pulled in beside it
    wheel = [(n, a) for n, a in pip if any(x.startswith("whisper-appliance==") for x in a)]
    assert len(wheel) == 1 and {"--no-deps", "--no-index"} <= set(wheel[0][1]), wheel
    assert pip.index(locked[0]) < pip.index(wheel[0])


def test_dist_ships_the_lock_in_the_wheelhouse() -> None:
    """The role and the Dockerfile read the hashes from the wheelhouse's own copy."""
    commands = shell_commands(ROOT / "scripts" / "dist.sh")
    assert 'install -m 0644 requirements.lock "$TMP/requirements.lock"' in commands
    docker = " ".join(shell_commands(ROOT / "Dockerfile"))
    assert "-r /wheelhouse/requirements.lock" in docker
