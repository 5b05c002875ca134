"""The docs stay true: every route is documented, the generated reference pages match the code,
and every shell block in README.md and docs/ is valid shell (the marked ones are run).

The README is the front door; the details live in the MkDocs site under docs/ (make docs).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from quart.typing import TestClientProtocol as Client

from appliance.web.app import create_app
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# A shell block preceded by this comment (invisible in the site) is run by
# test_marked_shell_blocks_run, from the repository root; every other one is syntax-checked.
RUN_MARK = "<!-- test: run -->"
SHELL_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?:sh|bash|shell)\b[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def doc_pages() -> list[Path]:
    """README.md and every Markdown page of the site (the theme overrides are no pages)."""
    pages = sorted(p for p in DOCS.rglob("*.md") if "overrides" not in p.relative_to(DOCS).parts)
    return [ROOT / "README.md", *pages]


def load_gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts/gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


# --- routes and the generated reference pages ---------------------------------------------


def test_docs_document_every_route(tmp_path: Path) -> None:
    """Every HTTP route and WebSocket appears in a docs page (the API reference holds the
    OpenAPI ones; WebSockets, /metrics and /help are in the hand-written pages)."""
    corpus = "\n".join(p.read_text() for p in doc_pages()[1:])
    app = create_app(make_settings(tmp_path))
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or (rule.rule.endswith("/") and rule.rule != "/"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        generic = re.sub(r"\{[a-z_]*id\}", "{id}", path)
        if not any(re.search(r"[` ]" + re.escape(p) + r"[`? ]", corpus) for p in (path, generic)):
            missing.append(path)
    assert not missing, f"routes missing in docs/: {missing}"


def test_reference_pages_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    """`scripts/gen_docs.py --check`: api.md and ansible.md are what the code generates."""
    assert load_gen_docs().main(["--check"]) == 0, capsys.readouterr().out


async def test_api_reference_is_rendered_from_what_openapi_json_serves(
    client: Client,
) -> None:
    """The schema gen_docs renders (built in-process, no server) is the one a running app
    serves at /openapi.json, and every operation of it has its section in api.md."""
    gen_docs = load_gen_docs()
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    served = await response.get_json()
    assert gen_docs.openapi_schema() == served
    page = (DOCS / "reference" / "api.md").read_text()
    for path, operations in served["paths"].items():
        for method in operations:
            if method in gen_docs.METHODS:
                assert f"### {method.upper()} `{path}`" in page, (method, path)


def test_gen_docs_check_reports_a_stale_page(tmp_path: Path) -> None:
    gen_docs = load_gen_docs()
    page = tmp_path / "api.md"
    page.write_text("# HTTP API reference\n\nold text\n")
    diff = "".join(gen_docs.stale({page: "# HTTP API reference\n\nnew text\n"}))
    assert "-old text" in diff and "+new text" in diff
    assert gen_docs.stale({page: page.read_text()}) == []


def test_gen_docs_markdown_escapes_hostile_text() -> None:
    gen_docs = load_gen_docs()
    assert gen_docs.text("a <script> `<kept>`") == "a &lt;script&gt; `<kept>`"
    assert gen_docs.cell("one | two\nthree") == "one \\| two three"
    assert "|" not in gen_docs.code("a|b")


# --- shell blocks ---------------------------------------------------------------------------


@dataclass
class ShellBlock:
    page: Path
    line: int
    body: str
    run: bool

    def __str__(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def shell_blocks(pages: list[Path] | None = None) -> list[ShellBlock]:
    blocks = []
    for page in doc_pages() if pages is None else pages:
        text = page.read_text()
        for match in SHELL_FENCE.finditer(text):
            indent = match["indent"]
            body = "".join(
                line.removeprefix(indent) for line in match["body"].splitlines(keepends=True)
            )
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(ShellBlock(page, line, body, before == RUN_MARK))
    return blocks


def test_docs_have_shell_blocks() -> None:
    blocks = shell_blocks()
    assert len(blocks) >= 10, [str(b) for b in blocks]
    assert {b.page.name for b in blocks} >= {"README.md"}


def test_shell_blocks_and_the_run_mark_are_recognised(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```sh\nls -l\n```\n\n"
        f"{RUN_MARK}\n```bash\necho ran\n```\n\n"
        "1. A list item:\n\n    ```sh\n    make help\n    ```\n\n```python\nprint()\n```\n"
    )
    blocks = shell_blocks([page])
    assert [(b.body, b.run) for b in blocks] == [
        ("ls -l\n", False),
        ("echo ran\n", True),
        ("make help\n", False),
    ]
    assert str(blocks[1]) == f"{page}:8"


@pytest.mark.parametrize("block", shell_blocks(), ids=str)
def test_shell_block_is_valid_shell(block: ShellBlock) -> None:
    """`bash -n`, and shfmt's parser where installed (make setup): a copy-pasted block parses.
    Placeholders must be shell too: `<vmid>` is a syntax error, `VMID=120` is not."""
    assert "\n$ " not in f"\n{block.body}", f"{block}: no `$ ` prompts in a shell block"
    result = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
    assert result.returncode == 0, f"{block}: {result.stderr}\n{block.body}"
    shfmt = shutil.which("shfmt")
    if shfmt:
        parsed = subprocess.run(
            [shfmt, "--to-json"], input=block.body, capture_output=True, text=True
        )
        assert parsed.returncode == 0, f"{block}: {parsed.stderr}\n{block.body}"


@pytest.mark.parametrize("block", [b for b in shell_blocks() if b.run], ids=str)
def test_marked_shell_blocks_run(block: ShellBlock, tmp_path: Path) -> None:
    """Blocks marked `<!-- test: run -->` run for real from the repository root, with the
    project's venv first on PATH and a throwaway HOME and DATA_DIR."""
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.body],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{block}:\n{block.body}\n{result.stdout}\n{result.stderr}"
