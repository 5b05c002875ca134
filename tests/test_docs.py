"""The README stays true: every route and every variable is documented there."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.web.app import create_app
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_route(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    app = create_app(make_settings(tmp_path))
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or (rule.rule.endswith("/") and rule.rule != "/"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        path = re.sub(r"\{[a-z_]*id\}", "{id}", path)
        if not re.search(r"[` ]" + re.escape(path) + r"[`?]", readme):
            missing.append(path)
    assert not missing, f"routes missing in README.md: {missing}"
