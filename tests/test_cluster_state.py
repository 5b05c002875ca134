"""Two appliance nodes on one PostgreSQL database, as behind HAProxy (issue 16): what one node
writes, the other serves — history found by search, runtime settings changed in the admin
panel — without restarting either. Each node is a real app (`create_app`) with its own DATA_DIR
and its own connection; the database is a real throw-away PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from quart import Quart

from appliance.core.engines.base import Segment, Transcript
from appliance.web.app import create_app
from appliance.web.services import Services
from appliance.web.settings_store import REFRESH_SECONDS
from tests.conftest import make_settings
from tests.pgserver import PgServer


@pytest.fixture
async def nodes(shared_pg: PgServer, tmp_path: Path) -> AsyncIterator[tuple[Quart, Quart]]:
    url = shared_pg.new_database()
    async with AsyncExitStack() as stack:
        apps = []
        for name in ("node1", "node2"):
            app = create_app(make_settings(tmp_path / name, database_url=url))
            await stack.enter_async_context(app.test_app())
            apps.append(app)
        yield apps[0], apps[1]


def services(app: Quart) -> Services:
    found: Services = app.extensions["appliance"]
    return found


async def test_history_written_on_one_node_is_found_on_the_other(
    nodes: tuple[Quart, Quart],
) -> None:
    first, second = nodes
    transcript = Transcript(
        " The quarterly numbers look excellent.",
        [Segment(0, 0.0, 2.5, " The quarterly numbers look excellent.")],
        "en",
        2.5,
    )
    entry = await services(first).history.add(
        transcript, source="api", model="tiny.en", filename="meeting.wav"
    )
    found = await second.test_client().get("/api/history", query_string={"q": "quarterl"})
    assert found.status_code == 200
    body = await found.get_json()
    assert [item["id"] for item in body["items"]] == [entry]
    # deleted on the second node: gone for the first as well
    assert (await second.test_client().delete(f"/api/history/{entry}")).status_code in (200, 204)
    assert (await first.test_client().get(f"/api/history/{entry}")).status_code == 404


async def test_a_settings_change_reaches_the_other_node(nodes: tuple[Quart, Quart]) -> None:
    first, second = nodes
    await services(first).settings_store.update({"max_upload_size": "12MB"})
    wanted = services(first).runtime.max_upload_size
    assert services(second).runtime.max_upload_size != wanted
    deadline = time.monotonic() + REFRESH_SECONDS * 3
    while services(second).runtime.max_upload_size != wanted:
        assert time.monotonic() < deadline, "the second node never took the change over"
        await asyncio.sleep(0.2)
    assert "max_upload_size" in services(second).settings_store.describe()["overridden"]
    # back to the default on the second node: the first node drops its override too
    default = services(second).settings_store.defaults["max_upload_size"]
    await services(second).settings_store.update({"max_upload_size": default})
    assert await services(first).settings_store.refresh()
    assert services(first).runtime.max_upload_size == default
    assert "max_upload_size" not in services(first).settings_store.describe()["overridden"]
    assert not await services(first).settings_store.refresh()  # nothing new: nothing done
