"""Every external command the project's own host-side files run, and whether each resolves.

Wave 1 passed CI on a machine that already had Debian's `lxc-templates` and failed on a fresh
one. This finds such gaps by reading the code instead of trusting memory:

- shell (`*.sh`, the pct stand-in, `molecule/run.sh`, `.ci/run`) and Makefile recipes are parsed
  with `shfmt --to-json` (a real shell parser): the first word of every simple command, seen
  through wrappers like `timeout`, `env`, `setsid` and `xargs`;
- Python (`tests/`, `bench/`, `scripts/`, `appliance/`): the literal program of every
  `subprocess.*([...])`, `create_subprocess_exec(...)` and `shutil.which(...)`; `which(a) or
  which(b)` needs only one of them; a command prefix (`["runuser", "-u", "postgres", "--"]`)
  spread in front of another command; a program found outside PATH (`pg_binary("initdb")`:
  Debian's PostgreSQL tools) as the file it must be;
- files the LXC stand-in includes from the host (`lxc.include = /usr/share/lxc/...`).

`list` prints what it found. `check --root DIR` resolves each command in the rootfs DIR (`chroot
DIR sh -c 'command -v NAME'`) unless the project's venv or the project itself provides it.
`make test-fresh` runs `check` in a minimal Debian 12 rootfs that holds only bootstrap.sh's
packages. Exit status 1 lists what is missing and where it is used.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Commands that run another command: skip their options (and arguments that take a value) and
# look at the wrapped command too.
WRAPPERS: dict[str, set[str]] = {
    "timeout": {"-s", "--signal", "-k", "--kill-after"},
    "env": {"-u", "--unset", "-C", "--chdir"},
    "setsid": set(),
    "nohup": set(),
    "nice": {"-n"},
    "exec": set(),
    "command": set(),
    "sudo": {"-u", "-g"},
    "xargs": {"-n", "-I", "-P", "-d", "-L", "-s", "-a"},
    "stdbuf": set(),
    "flock": {"-w", "-E"},
    "unshare": set(),
    "ip": set(),  # `ip netns exec NS cmd`: handled below
}
# Shell words that are never external programs.
SHELL_WORDS = set(
    subprocess.run(
        ["bash", "-c", "compgen -b; compgen -k"], capture_output=True, text=True, check=True
    ).stdout.split()
) | {"[[", "]]", "[", "true", "false"}
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.+-]*$")


class Found:
    def __init__(self) -> None:
        self.commands: dict[str, set[str]] = defaultdict(set)
        # groups of alternatives, any one of which is enough (`which(a) or which(b)`)
        self.alternatives: list[tuple[tuple[str, ...], str]] = []
        self.files: dict[str, set[str]] = defaultdict(set)
        self.functions: set[str] = set()  # shell functions (lib.sh's are used by its callers)

    def add(self, name: str, where: str) -> None:
        if NAME.match(name) and name not in SHELL_WORDS and name != "MAKEVAR":
            self.commands[name].add(where)


# Programs that tools we drive run on our behalf, which no source line names.
IMPLICIT = {"ssh": "ansible's ssh connection (molecule, make image)", "make": ".ci/run"}

# --- shell --------------------------------------------------------------------------------


def _literal(word: dict[str, Any]) -> str | None:
    """The word's text when it is a plain literal (no expansion), else None."""
    parts = word.get("Parts") or []
    text = ""
    for part in parts:
        if part.get("Type") == "Lit" or part.get("Type") in ("SglQuoted",):
            text += part.get("Value", "")
        elif part.get("Type") == "DblQuoted" and all(
            p.get("Type") == "Lit" for p in part.get("Parts") or []
        ):
            text += "".join(p.get("Value", "") for p in part.get("Parts") or [])
        else:
            return None
    return text or None


def _param_name(word: dict[str, Any]) -> str | None:
    parts = word.get("Parts") or []
    if len(parts) == 1 and parts[0].get("Type") == "ParamExp":
        return str(parts[0]["Param"]["Value"])
    return None


def _call_commands(args: list[dict[str, Any]]) -> list[str]:
    """The program of a simple command, and of the commands it wraps."""
    words = [_literal(a) for a in args]
    out: list[str] = []
    i = 0
    if len(args) > 1 and words[0] is None and _param_name(args[0]) == "SUDO":
        i = 1  # `$SUDO apt-get ...`: empty when already root
    while i < len(words):
        word = words[i]
        if word is None:
            return out
        out.append(word)
        if word == "ip" and words[i + 1 : i + 3] == ["netns", "exec"]:
            i += 4  # ip netns exec NS cmd
            continue
        if word not in WRAPPERS or word == "ip":
            return out
        takes_value = WRAPPERS[word]
        i += 1
        while i < len(words):
            w = words[i]
            if w is None:
                return out
            if w in takes_value:
                i += 2
            elif w.startswith("-") or "=" in w or (word == "timeout" and w[:1].isdigit()):
                i += 1
            else:
                break
    return out


def _walk_shell(node: Any, where: str, found: Found, functions: set[str]) -> None:
    if isinstance(node, dict):
        if node.get("Type") == "FuncDecl":
            functions.add(node["Name"]["Value"])
        if node.get("Type") == "CallExpr" and node.get("Args"):
            for name in _call_commands(node["Args"]):
                found.add(name, where)
        for value in node.values():
            _walk_shell(value, where, found, functions)
    elif isinstance(node, list):
        for value in node:
            _walk_shell(value, where, found, functions)


def scan_shell(source: str, where: str, found: Found) -> None:
    parsed = subprocess.run(["shfmt", "--to-json"], input=source, capture_output=True, text=True)
    if parsed.returncode != 0:
        raise SystemExit(f"{where}: shfmt cannot parse {source[:200]!r}: {parsed.stderr}")
    tree = json.loads(parsed.stdout)
    _walk_shell(tree, where, found, found.functions)


MAKE_VALUES: dict[str, str] = {}


def makefile_recipes(path: Path) -> list[str]:
    """The shell lines a Makefile runs: recipe lines and $(shell ...) calls, make syntax removed."""
    lines: list[str] = []
    text = path.read_text().replace("\\\n", " ")
    for name, value in re.findall(r"^([A-Z_]+) *[?:]?= *([A-Za-z0-9_.-]+) *$", text, re.M):
        MAKE_VALUES.setdefault(name, value)  # PODMAN ?= podman
    for line in text.splitlines():
        lines += re.findall(r"\$\(shell ((?:[^()]|\([^()]*\))*)\)", line)
        if line.startswith("\t"):
            lines.append(line.lstrip("\t").lstrip("@-+"))
    out = []
    for line in lines:
        line = line.replace("$$", "\0")
        for name, value in MAKE_VALUES.items():
            line = line.replace(f"$({name})", value)
        while True:  # innermost make expansions first: $(if $(filter ...),...)
            plain = re.sub(r"\$\([^()$]*\)|\$\{[^{}$]*\}|\$[@<^*?]", "MAKEVAR", line)
            if plain == line:
                break
            line = plain
        out.append(line.replace("\0", "$"))
    return out


# --- python -------------------------------------------------------------------------------

SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}
# Helpers that find a program outside PATH, and where (a glob) the program must then be.
PROGRAM_FINDERS = {"pg_binary": "/usr/lib/postgresql/*/bin/{}"}


def _program(node: ast.expr) -> str | None:
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.split()[0] if node.value.split() else None
    return None


def _which(node: ast.expr) -> str | None:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "which"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def _command_prefix(node: ast.AST) -> str | None:
    """The program of a literal command prefix, a list of words ending in `--`."""
    if not isinstance(node, ast.List) or len(node.elts) < 2:
        return None
    words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
    if len(words) != len(node.elts) or words[-1] != "--" or not isinstance(words[0], str):
        return None
    return words[0]


def scan_python(source: str, where: str, found: Found) -> None:
    tree = ast.parse(source)
    grouped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            names = [_which(v) for v in node.values]
            if sum(n is not None for n in names) > 1:
                found.alternatives.append((tuple(n for n in names if n), where))
                grouped.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if prefix := _command_prefix(node):
            found.add(prefix, where)
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        finder = PROGRAM_FINDERS.get(attr)
        if (
            finder
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.files[finder.format(node.args[0].value)].add(where)
        owner = ""
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = func.value.id
        program = None
        if (owner == "subprocess" and attr in SUBPROCESS_CALLS) or attr == "create_subprocess_exec":
            program = _program(node.args[0])
        elif attr == "which" and id(node) not in grouped:
            program = _which(node)
        if program and "/" not in program:
            found.add(program, where)


# --- the project --------------------------------------------------------------------------


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def is_shell(path: Path) -> bool:
    if path.suffix == ".sh" or (path.name == "run" and path.parent.name == ".ci"):
        return True
    head = path.read_bytes()[:64]
    return head.startswith(b"#!") and b"sh" in head.split(b"\n")[0]


def scan_project() -> Found:
    found = Found()
    shell_files = [
        p
        for p in tracked("*.sh", "scripts", "molecule/run.sh", ".ci/run", "install.sh")
        if is_shell(p) and not p.name.endswith(".md")
    ]
    for path in sorted(set(shell_files)):
        scan_shell(path.read_text(), str(path.relative_to(ROOT)), found)
    for path in tracked("Makefile", "mk/*.mk"):  # values first: fragments use each other's
        makefile_recipes(path)
    for path in tracked("Makefile", "mk/*.mk"):
        for line in makefile_recipes(path):
            scan_shell(line, str(path.relative_to(ROOT)), found)
    for path in tracked("tests", "bench", "scripts", "appliance"):
        if path.suffix == ".py":
            scan_python(path.read_text(), str(path.relative_to(ROOT)), found)
    for name in found.functions:
        found.commands.pop(name, None)
    for name, why in IMPLICIT.items():
        found.commands[name].add(why)
    for path in tracked("scripts/pct-standin"):
        for include in re.findall(r"lxc\.include = (/\S+?)\"?$", path.read_text(), re.M):
            found.files[include].add(str(path.relative_to(ROOT)))
    return found


def provided_here(name: str, venv: Path) -> bool:
    """Programs the project ships itself, or installs into its venv from PyPI."""
    return (venv / "bin" / name).exists() or (ROOT / "scripts/pct-standin" / name).is_file()


# install.sh runs on a Proxmox host: its pct/pvesm/... come from Proxmox (the stand-in in tests).
PROXMOX_HOST = {"pct", "pveam", "pvesm", "pvesh", "pveversion", "qm"}


def check(rootfs: Path, venv: Path, found: Found) -> list[str]:
    names = [n for n in found.commands if n not in PROXMOX_HOST and not provided_here(n, venv)]
    names += [a for group, _ in found.alternatives for a in group]
    script = "".join(f"command -v {n} >/dev/null || echo {n}\n" for n in sorted(set(names)))
    missing = set(
        subprocess.run(
            ["chroot", str(rootfs), "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    problems = [
        f"command {n!r} not found (used in {', '.join(sorted(found.commands[n]))})"
        for n in sorted(missing & set(found.commands))
        if n not in PROXMOX_HOST and not provided_here(n, venv)
    ]
    for group, where in found.alternatives:
        if set(group) <= missing:
            problems.append(f"none of {', '.join(group)} found (used in {where})")
    for file, places in sorted(found.files.items()):  # a glob: any one match will do
        if not any(path.is_file() for path in rootfs.glob(file.lstrip("/"))):
            problems.append(f"file {file} missing (used in {', '.join(sorted(places))})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="print every command and file found, with where it is used")
    chk = sub.add_parser("check", help="resolve each one inside a rootfs")
    chk.add_argument("--root", type=Path, required=True, help="the rootfs to chroot into")
    chk.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the project's venv")
    args = parser.parse_args()
    found = scan_project()
    if args.verb == "list":
        report = {
            "commands": {n: sorted(w) for n, w in sorted(found.commands.items())},
            "alternatives": [list(g) for g, _ in found.alternatives],
            "files": {f: sorted(w) for f, w in sorted(found.files.items())},
        }
        print(json.dumps(report, indent=1))
        return 0
    problems = check(args.root, args.venv, found)
    total = len(found.commands) + len(found.alternatives) + len(found.files)
    for line in problems:
        print(f"MISSING: {line}")
    print(f"{total} commands and files checked in {args.root}: {len(problems)} missing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
