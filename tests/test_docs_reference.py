"""The reference pages list exactly what the code reads: a setting or a role variable added
without documentation fails here, and so does a documented one the code no longer reads.

- Environment variables: the fields of every pydantic-settings model of the appliance (the
  service's Settings, the updater's Config, any later one), plus every literal variable name
  the code reads from an environment mapping (`os.environ`, `os.getenv`, an `env` mapping, the
  names a `from_env` builds from), found by parsing it — against the variable tables of
  docs/reference/configuration.md.
- Ansible: every role variable in defaults/main.yml or read by the role's tasks and templates is
  declared in meta/argument_specs.yml with a description and appears in docs/reference/ansible.md;
  every role variable the docs, playbooks and inventories name exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "reference" / "configuration.md"
ANSIBLE_PAGE = ROOT / "docs" / "reference" / "ansible.md"
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
# Variables the code reads that belong to other programs, not to the appliance's settings.
FOREIGN = {
    "PIP_INDEX_URL": "pip's own index setting, followed when fetching the speaker model",
    "XDG_CACHE_HOME": "the XDG cache directory (model conversion cache of a source checkout)",
}
ENV_MAPPINGS = {"env", "environ", "environment"}


# --- environment variables ------------------------------------------------------------------


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings model of the appliance (the service's, the updater's, any later one)."""
    import appliance.system.config
    import appliance.system.update.settings  # the updater's (the web app never imports it)
    import appliance.web.app  # noqa: F401 - loads the modules that may define more

    found, todo = [], [BaseSettings]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("appliance.") and cls.model_fields:
                found.append(cls)
    return found


def settings_variables() -> dict[str, set[str]]:
    """The variables each settings model reads: its fields' aliases, or prefix + name with an
    env_prefix (a field with neither is set in code only: EnvSettings reads aliases alone)."""
    names: dict[str, set[str]] = {}
    for cls in settings_classes():
        prefix = str(cls.model_config.get("env_prefix") or "")
        for field_name, info in cls.model_fields.items():
            alias = info.validation_alias or info.alias
            if isinstance(alias, AliasChoices):
                variables = [c for c in alias.choices if isinstance(c, str)]
            elif isinstance(alias, str):
                variables = [alias]
            elif prefix:
                variables = [(prefix + field_name).upper()]
            else:
                variables = []
            for variable in variables:
                names.setdefault(variable, set()).add(f"{cls.__module__}.{cls.__name__}")
    return names


def _is_env(node: ast.expr) -> bool:
    if isinstance(node, ast.Attribute) and node.attr == "environ":
        return True
    return isinstance(node, ast.Name) and node.id in ENV_MAPPINGS


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def env_reads(source: str) -> set[str]:
    """Literal variable names a module reads from an environment mapping."""
    names: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault")
                    and _is_env(func.value)) or (
                isinstance(func, ast.Attribute) and func.attr == "getenv"
            ):  # fmt: skip
                names.add(_literal(node.args[0]) or "")
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)  # `env["X"] = ...` sets a child's variable
            and _is_env(node.value)
        ):
            names.add(_literal(node.slice) or "")
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.In | ast.NotIn)
            and _is_env(node.comparators[0])
        ):
            names.add(_literal(node.left) or "")
        elif isinstance(node, ast.FunctionDef) and node.name == "from_env":
            # names kept in tables and looked up in a loop (`for var, attr in paths.items()`)
            for inner in ast.walk(node):
                value = _literal(inner) if isinstance(inner, ast.expr) else None
                if value and ENV_NAME.match(value):
                    names.add(value)
    return {n for n in names if ENV_NAME.match(n)}


def code_variables() -> dict[str, set[str]]:
    """Every variable the appliance reads, with the modules that read it."""
    found = settings_variables()
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        for name in env_reads(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def documented_variables() -> set[str]:
    """First-column variable names of the tables in configuration.md (`| `NAME` ... |`)."""
    text = CONFIGURATION.read_text()
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`", text, flags=re.MULTILINE))


def test_the_scan_finds_variables_of_every_kind() -> None:
    source = (
        "import os\n"
        "env = {}\n"
        "env['SET_ONLY'] = '1'\n"
        "a = os.environ.get('ONE_A')\n"
        "b = os.environ['TWO_B']\n"
        "c = os.getenv('THREE_C')\n"
        "def from_env(env):\n"
        "    table = {'FOUR_D': 'x'}\n"
        "    return 'FIVE_E' in env, env.get('SIX_F'), 'not a name'\n"
    )
    assert env_reads(source) == {"ONE_A", "TWO_B", "THREE_C", "FOUR_D", "FIVE_E", "SIX_F"}
    found = code_variables()
    assert {"DATA_DIR", "HTTPS_PORT", "WATCH_DIR"} <= set(found)
    assert {"UPDATER_ROOT", "UPDATER_URL"} <= set(found)  # the updater's own from_env


def test_every_variable_the_code_reads_is_documented() -> None:
    documented = documented_variables()
    missing = {
        name: sorted(where)
        for name, where in code_variables().items()
        if name not in documented and name not in FOREIGN
    }
    assert not missing, f"read by the code, missing in {CONFIGURATION.name}: {missing}"


def test_no_documented_variable_is_stale() -> None:
    stale = documented_variables() - set(code_variables()) - set(FOREIGN)
    assert not stale, f"documented in {CONFIGURATION.name} but read nowhere: {sorted(stale)}"


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of every Markdown table, as {header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def test_settings_defaults_match_the_configuration_page() -> None:
    """A table's Default column says what the settings model really defaults to, where it shows
    a literal value (in backticks; prose such as "private networks" is left to the reader)."""
    shown = {}
    for row in table_rows(CONFIGURATION.read_text()):
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]+)`.*", row.get("Variable", ""))
        value = re.fullmatch(r"`([^`]*)`", row.get("Default", ""))
        if name and value:
            shown[name[1]] = value[1]
    assert len(shown) >= 30, shown
    wrong = {
        name: (shown[name], default)
        for cls in settings_classes()
        for name, default, _ in cls.documentation()  # type: ignore[attr-defined]
        if name in shown and shown[name] != default
    }
    assert not wrong, f"defaults in {CONFIGURATION.name} differ from the settings: {wrong}"


# --- Ansible role variables -----------------------------------------------------------------


def roles() -> list[str]:
    return sorted(p.parent.parent.name for p in ROOT.glob("roles/*/meta/argument_specs.yml"))


def options(role: str) -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    merged: dict[str, dict[str, Any]] = {}
    for entry in (spec.get("argument_specs") or {}).values():
        merged.update(entry.get("options") or {})
    return merged


def _files(*patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def jinja(text: str) -> str:
    """Only the Jinja expressions and statements of a template (its literal text is output)."""
    return "\n".join(re.findall(r"\{\{.*?\}\}|\{%.*?%\}", text, flags=re.DOTALL))


def yaml_blocks(text: str) -> str:
    """The YAML examples of a Markdown page (prose names JSON fields and metrics alike)."""
    blocks = re.findall(r"^\s*```ya?ml[^\n]*\n(.*?)^\s*```", text, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(blocks)


def role_text(path: Path) -> str:
    text = path.read_text(errors="replace")
    if path.suffix == ".j2":
        return jinja(text)
    if path.suffix == ".md":
        return yaml_blocks(text)
    return text


def role_names_in(text: str, role: str) -> tuple[set[str], set[str]]:
    """(names read, names set) of the role's prefix in a YAML or template text. A name as a
    mapping key sets it (set_fact, add_host, vars); `register:` sets it too; a module's FQCN
    (`community.postgresql.postgresql_user`) and YAML anchors are no variables."""
    pattern = re.compile(r"(?<![\w.&*-])" + re.escape(role) + r"_[a-z0-9_]+\b(?!\s*\()")
    read, set_ = set(), set()
    for match in pattern.finditer(text):
        rest = text[match.end() : match.end() + 3]
        line_start = text.rfind("\n", 0, match.start()) + 1
        before = text[line_start : match.start()]
        as_key = rest.startswith(":") and not before.strip(" -")
        if as_key or re.search(r"\bregister:\s*$", before):
            set_.add(match[0])
        else:
            read.add(match[0])
    return read, set_


@pytest.mark.parametrize("role", roles())
def test_every_role_variable_is_declared_and_described(role: str) -> None:
    declared = options(role)
    undescribed = [n for n, o in declared.items() if not o.get("description")]
    assert not undescribed, f"{role}: argument_specs without a description: {undescribed}"
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults/main.yml").read_text()) or {}
    assert set(defaults) <= set(declared), (
        f"{role}: undeclared defaults {set(defaults) - set(declared)}"
    )
    read: set[str] = set()
    facts: set[str] = set()
    for path in _files(f"roles/{role}/tasks/**/*", f"roles/{role}/handlers/**/*",
                       f"roles/{role}/templates/**/*", f"roles/{role}/vars/**/*"):  # fmt: skip
        r, s = role_names_in(role_text(path), role)
        read |= r
        facts |= s
    undeclared = sorted(read - set(declared) - facts)
    assert not undeclared, f"{role}: read by the role but not in argument_specs: {undeclared}"


@pytest.mark.parametrize("role", roles())
def test_every_role_variable_is_in_the_ansible_reference(role: str) -> None:
    page = ANSIBLE_PAGE.read_text()
    assert f"## {role}\n" in page, f"role {role} missing in {ANSIBLE_PAGE.name}"
    missing = [n for n in options(role) if f"| `{n}` |" not in page]
    assert not missing, f"{role}: missing in {ANSIBLE_PAGE.name}: {missing}"


def test_no_stale_role_variable_in_docs_playbooks_and_inventories() -> None:
    """A role variable named in the docs' and README's YAML examples, playbooks, inventories or
    molecule scenarios exists: declared in the role's argument_specs, or a fact the role sets."""
    known: dict[str, set[str]] = {}
    for role in roles():
        names = set(options(role))
        for path in _files(f"roles/{role}/tasks/**/*", f"roles/{role}/handlers/**/*"):
            names |= role_names_in(path.read_text(errors="replace"), role)[1]
        known[role] = names
    places = _files(
        "README.md", "docs/**/*.md", "site.yml", "playbooks/**/*.yml", "inventory/**/*",
        "molecule/**/*.yml", "deploy/**/*.yml",
    )  # fmt: skip
    stale = []
    for path in places:
        text = role_text(path)
        for role, names in known.items():
            read, set_ = role_names_in(text, role)
            stale += [f"{path.relative_to(ROOT)}: {n}" for n in sorted((read | set_) - names)]
    assert not stale, "role variables that do not exist:\n" + "\n".join(stale)
