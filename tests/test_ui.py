"""The main page without a browser: panels, options, assets served locally, no inline script."""

from __future__ import annotations

import re
from pathlib import Path

from quart.typing import TestClientProtocol as Client

STATIC = Path(__file__).resolve().parent.parent / "appliance" / "web" / "static"


async def page(client: Client) -> str:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.content_type.startswith("text/html")
    return (await response.get_data()).decode()


async def test_index_has_three_panels_and_options(client: Client) -> None:
    html = await page(client)
    for panel in ("files", "live", "history"):
        assert f'id="panel-{panel}"' in html
        assert f'id="tab-{panel}"' in html
    assert re.search(r'<option value="tiny.en"\s+selected', html)
    assert '<option value="auto"' in html
    assert '<option value="de"' in html
    assert 'data-chunk-samples="3200"' in html
    # accessible: every select and input has a label
    for control in re.findall(r'<(?:select|input)[^>]*\sid="([^"]+)"', html):
        assert f'for="{control}"' in html or "aria-label" in html.split(f'id="{control}"')[1][:200]
    assert 'href="/ca.crt"' in html and 'href="/trust"' in html


async def test_no_inline_script_and_no_foreign_assets(client: Client) -> None:
    html = await page(client)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts
    for attrs, body in scripts:
        assert 'type="module"' in attrs and "src=" in attrs and not body.strip()
    assert not re.search(r"\son[a-z]+=", html), "inline event handlers break the CSP"
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html), "every asset must be local"
    for path in STATIC.glob("js/**/*.js"):
        if path.name == "docs.js":
            continue
        assert not re.search(r"https?://", path.read_text()), path
        assert "eval(" not in path.read_text()


async def test_every_referenced_asset_is_served(client: Client) -> None:
    html = await page(client)
    assets = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    assert any(a.endswith(".css") for a in assets)
    # the ES modules import each other and the AudioWorklet by relative URL
    modules = ["app.js"]
    seen: set[str] = set()
    while modules:
        name = modules.pop()
        if name in seen:
            continue
        seen.add(name)
        text = (STATIC / "js" / name).read_text()
        modules += re.findall(r'from "\./([\w-]+\.js)"', text)
        modules += re.findall(r'new URL\("\./([\w-]+\.js)"', text)
    assets |= {f"/static/js/{name}" for name in seen}
    assert "/static/js/pcm-worklet.js" in assets
    for asset in sorted(assets):
        response = await client.get(asset)
        assert response.status_code == 200, asset
        kind = "javascript" if asset.endswith(".js") else "css"
        assert kind in response.content_type, (asset, response.content_type)


async def test_live_status(client: Client) -> None:
    response = await client.get("/api/live")
    body = await response.get_json()
    assert body["sessions"] == 0
    assert body["sample_rate"] == 16000
    assert body["chunk_samples"] == 3200
    assert body["limits"]["max_bytes_per_second"] == 64000
