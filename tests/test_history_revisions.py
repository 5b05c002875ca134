"""The transcript editor's API: revisions, restore, conflicts, hostile edits, search and
exports following the latest revision, and the schema migration from an older database."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from appliance.core import formats
from appliance.core import history as history_module
from appliance.core.db import Database
from appliance.core.engines.base import Segment, Transcript, Word
from appliance.core.history import MIGRATIONS, History
from tests.test_history import HOSTILE


def _transcript() -> Transcript:
    segments = [
        Segment(
            0,
            0.0,
            2.0,
            " the quick brown fox",
            (Word(0.0, 0.4, " the", 0.9), Word(0.5, 1.0, " quick", 0.9)),
            avg_logprob=-0.2,
        ),
        Segment(1, 2.0, 4.0, " jumps over the lazy dog"),
        Segment(2, 4.5, 6.0, " and runs away"),
    ]
    return Transcript(
        "the quick brown fox jumps over the lazy dog and runs away", segments, "en", 6.5
    )


@pytest.fixture
async def entry_id(app: Quart) -> str:
    history: History = app.extensions["appliance"].history
    return await history.add(_transcript(), source="api", model="tiny.en", filename="fox.wav")


def _edit(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": s["id"], "start": s["start"], "end": s["end"], "text": s["text"]}
        for s in entry["segments"]
    ]


async def _get(client: Client, entry_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/history/{entry_id}")
    assert response.status_code == 200
    data: dict[str, Any] = await response.get_json()
    assert response.headers["ETag"] == f'"r{data["revision"]}"'
    return data


async def _patch(client: Client, entry_id: str, body: object, **headers: str) -> Any:
    return await client.patch(f"/api/history/{entry_id}", json=body, headers=headers or None)


async def test_edit_restore_and_revisions(client: Client, entry_id: str) -> None:
    entry = await _get(client, entry_id)
    assert entry["revision"] == 0 and entry["speakers"] == {}
    segments = _edit(entry)
    segments[1]["text"] = "leaps over the sleepy cat"
    segments[0]["speaker"] = "SPEAKER_1"
    segments[2]["speaker"] = "SPEAKER_2"
    response = await _patch(
        client,
        entry_id,
        {"base_revision": 0, "segments": segments, "speakers": {"SPEAKER_1": "Alice"}},
    )
    assert response.status_code == 200, await response.get_data()
    edited = await response.get_json()
    assert edited["revision"] == 1
    assert edited["text"] == "the quick brown fox leaps over the sleepy cat and runs away"
    assert edited["speakers"] == {"SPEAKER_1": "Alice"}
    # an unchanged segment keeps its word timings and scores, a changed one loses them
    assert [w["word"] for w in edited["segments"][0]["words"]] == [" the", " quick"]
    assert edited["segments"][0]["avg_logprob"] == -0.2
    assert "words" not in edited["segments"][1]
    assert edited["segments"][0]["speaker"] == "SPEAKER_1"

    revisions = (await (await client.get(f"/api/history/{entry_id}/revisions")).get_json())[
        "revisions"
    ]
    assert [(r["revision"], r["note"], r["latest"]) for r in revisions] == [
        (0, "original", False),
        (1, "edit", True),
    ]
    original = await (await client.get(f"/api/history/{entry_id}/revisions/0")).get_json()
    assert original["text"].startswith("the quick brown fox jumps")
    assert original["segments"][1]["text"] == " jumps over the lazy dog"
    assert (await client.get(f"/api/history/{entry_id}/revisions/7")).status_code == 404

    # exports follow the latest revision
    srt = await (await client.get(f"/api/history/{entry_id}/export?format=srt")).get_data()
    assert b"leaps over the sleepy cat" in srt and b"lazy" not in srt
    data = json.loads(
        await (await client.get(f"/api/history/{entry_id}/export?format=json")).get_data()
    )
    assert data["speakers"] == {"SPEAKER_1": "Alice"}

    # restore the original: a new revision, nothing lost
    response = await client.post(
        f"/api/history/{entry_id}/revisions/0/restore", json={"base_revision": 1}
    )
    assert response.status_code == 200
    restored = await response.get_json()
    assert restored["revision"] == 2 and "lazy dog" in restored["text"]
    assert restored["speakers"] == {}
    revisions = (await (await client.get(f"/api/history/{entry_id}/revisions")).get_json())[
        "revisions"
    ]
    assert [(r["revision"], r["note"]) for r in revisions][-1] == (2, "restored 0")
    assert (await client.post(f"/api/history/{entry_id}/revisions/9/restore")).status_code == 404
    stale = await client.post(
        f"/api/history/{entry_id}/revisions/1/restore", json={"base_revision": 1}
    )
    assert stale.status_code == 409
    assert (await stale.get_json())["error"]["current_revision"] == 2


async def test_never_edited_entry_has_its_original_as_revision_0(
    client: Client, entry_id: str
) -> None:
    revisions = await (await client.get(f"/api/history/{entry_id}/revisions")).get_json()
    assert [(r["revision"], r["latest"]) for r in revisions["revisions"]] == [(0, True)]
    assert (await client.get(f"/api/history/{entry_id}/revisions/0")).status_code == 200
    response = await client.post(f"/api/history/{entry_id}/revisions/0/restore")
    assert response.status_code == 200 and (await response.get_json())["revision"] == 0
    for path in ("", "/revisions", "/revisions/0"):
        assert (await client.get(f"/api/history/nope{path}")).status_code == 404
    assert (await _patch(client, "nope", {"base_revision": 0, "segments": []})).status_code == 404


async def test_two_tabs_editing_the_same_revision_conflict(client: Client, entry_id: str) -> None:
    entry = await _get(client, entry_id)
    first, second = _edit(entry), _edit(entry)
    first[0]["text"] = "tab one"
    second[0]["text"] = "tab two"
    ok = await _patch(client, entry_id, {"base_revision": 0, "segments": first})
    assert ok.status_code == 200
    late = await _patch(client, entry_id, {"base_revision": 0, "segments": second})
    assert late.status_code == 409
    body = await late.get_json()
    assert body["error"]["code"] == "revision_conflict"
    assert body["error"]["current_revision"] == 1
    assert late.headers["ETag"] == '"r1"'
    assert (await _get(client, entry_id))["segments"][0]["text"] == " tab one"
    # If-Match instead of base_revision
    stale = await _patch(client, entry_id, {"segments": second}, **{"If-Match": '"r0"'})
    assert stale.status_code == 409
    fresh = await _patch(client, entry_id, {"segments": second}, **{"If-Match": '"r1"'})
    assert fresh.status_code == 200 and (await fresh.get_json())["revision"] == 2
    missing = await _patch(client, entry_id, {"segments": second})
    assert missing.status_code == 428


def _segment(**over: object) -> dict[str, object]:
    return {"start": 0.0, "end": 1.0, "text": "hi", **over}


@pytest.mark.parametrize(
    ("segments", "status", "code"),
    [
        ([_segment(start=-1)], 400, "invalid_edit"),
        ([_segment(start=2, end=1)], 400, "invalid_edit"),
        ([_segment(end=3600)], 400, "invalid_edit"),
        ([_segment(start=3, end=4), _segment(start=1, end=2)], 400, "invalid_edit"),
        ([_segment(start="0")], 400, "invalid_edit"),
        ([_segment(start=True)], 400, "invalid_edit"),
        ([_segment(text=None)], 400, "invalid_edit"),
        ([_segment(text=["a"])], 400, "invalid_edit"),
        ([_segment(speaker=5)], 400, "invalid_edit"),
        ([_segment(speaker="x" * 101)], 400, "invalid_edit"),
        ([_segment(text="x" * 2001)], 413, "text_too_long"),
        ([_segment(text="word " * 400)] * 600, 413, "text_too_long"),
        ([_segment()] * 10_001, 413, "too_many_segments"),
        ([_segment(start=0, end=0, text="")] * 100_000, 413, "too_many_segments"),
        ([_segment(text="x" * 5_000_000)], 413, "body_too_large"),
        (["not an object"], 400, "invalid_edit"),
        ({"0": _segment()}, 400, "invalid_edit"),
        (None, 400, "invalid_edit"),
    ],
)
async def test_hostile_edits_are_refused(
    client: Client, entry_id: str, segments: object, status: int, code: str
) -> None:
    response = await _patch(client, entry_id, {"base_revision": 0, "segments": segments})
    assert response.status_code == status, await response.get_data()
    assert (await response.get_json())["error"]["code"] == code
    assert (await _get(client, entry_id))["revision"] == 0


async def test_hostile_bodies_and_speakers_are_refused(client: Client, entry_id: str) -> None:
    good = _edit(await _get(client, entry_id))
    cases: list[tuple[object, int]] = [
        ({"base_revision": "0", "segments": good}, 400),
        ({"base_revision": -1, "segments": good}, 400),
        ({"base_revision": 0, "segments": good, "speakers": ["a"]}, 400),
        ({"base_revision": 0, "segments": good, "speakers": {"a": 1}}, 400),
        ({"base_revision": 0, "segments": good, "speakers": {"a\x00": "b"}}, 400),
        (
            {"base_revision": 0, "segments": good, "speakers": {f"s{i}": "n" for i in range(101)}},
            413,
        ),
        ([good], 400),
    ]
    for body, status in cases:
        response = await _patch(client, entry_id, body)
        assert response.status_code == status, (body, await response.get_data())
        assert "error" in await response.get_json()
    response = await client.patch(
        f"/api/history/{entry_id}", data="{", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    response = await client.patch(f"/api/history/{entry_id}", data="x")
    assert response.status_code == 415
    assert (await _get(client, entry_id))["revision"] == 0


async def test_search_finds_edited_words_and_not_removed_ones(
    client: Client, entry_id: str
) -> None:
    async def hits(q: str) -> int:
        page = await (await client.get(f"/api/history?q={q}")).get_json()
        return int(page["total"])

    assert await hits("lazy") == 1 and await hits("zebra") == 0
    segments = _edit(await _get(client, entry_id))
    segments[1]["text"] = "jumps over the zebra"
    assert (
        await _patch(client, entry_id, {"base_revision": 0, "segments": segments})
    ).status_code == 200
    assert await hits("zebra") == 1
    assert await hits("lazy") == 0
    assert await hits("fox.wav") == 1  # the file name is still indexed
    restored = await client.post(f"/api/history/{entry_id}/revisions/0/restore")
    assert restored.status_code == 200
    assert await hits("lazy") == 1 and await hits("zebra") == 0
    assert (await client.delete(f"/api/history/{entry_id}")).status_code == 200
    assert await hits("lazy") == 0


async def test_hostile_searches_are_answered_200_or_400(client: Client, entry_id: str) -> None:
    """Any `q`, on either backend (`APPLIANCE_TEST_DB=postgresql` runs this on PostgreSQL):
    results or `invalid_query`, never a 5xx, and searching still works after."""
    queries = [quote(q.encode("utf-8", "surrogatepass")) for q in HOSTILE]
    for raw in [*queries, "%FF", "%ED%A0%80", "fox%00", "%27%3B--"]:
        response = await client.get(f"/api/history?q={raw}")
        assert response.status_code in (200, 400), (raw, await response.get_data())
        if response.status_code == 400:
            assert (await response.get_json())["error"]["code"] == "invalid_query", raw
    page = await (await client.get("/api/history?q=fox.wa")).get_json()
    assert [item["id"] for item in page["items"]] == [entry_id]


@pytest.mark.sqlite_only
async def test_migration_from_an_older_database_keeps_entries(tmp_path: Path) -> None:
    """A database of the release before the editor upgrades; deleting an entry (or retention)
    removes its revisions."""
    db = await Database.open(tmp_path / "old.db")
    await db.migrate("history", MIGRATIONS[:2])
    old = History(db)
    await db.conn.execute(
        "INSERT INTO transcripts (id, created, source, model, text, segments)"
        " VALUES ('old', 1, 'api', 'm', 'hello there', '[]')"
    )
    await db.conn.execute(
        "INSERT INTO transcripts_fts(rowid, text, filename)"
        " SELECT rowid, text, filename FROM transcripts WHERE id = 'old'"
    )
    await db.conn.commit()
    await old.migrate()
    entry = await old.get("old")
    assert entry is not None and entry["revision"] == 0 and entry["speakers"] == {}
    assert (
        await old.save_revision("old", 0, [{"id": 0, "start": 0, "end": 1, "text": " bye"}], {})
        == 1
    )
    assert (await old.list("bye"))[1] == 1 and (await old.list("hello"))[1] == 0
    assert await old.delete("old")
    async with db.conn.execute("SELECT count(*) FROM transcript_revisions") as cur:
        assert (await cur.fetchone())[0] == 0
    await db.close()


@dataclass(frozen=True)
class SpokenSegment(Segment):
    """A segment with a diarization label (what the diarization work adds)."""

    speaker: str | None = None


def test_exports_show_renamed_speakers() -> None:
    t = Transcript(
        "hi there. hello. bye",
        [
            SpokenSegment(0, 0.0, 1.0, " hi there.", speaker="SPEAKER_1"),
            SpokenSegment(1, 1.0, 2.0, " hello.", speaker="SPEAKER_2"),
            SpokenSegment(2, 2.0, 3.0, " bye", speaker="SPEAKER_2"),
        ],
        "en",
        3.0,
    )
    names = {"SPEAKER_1": "Alice"}
    assert formats.render(t, "txt", names) == "[Alice] hi there.\n[SPEAKER_2] hello. bye\n"
    assert "[Alice] hi there." in formats.render(t, "srt", names)
    assert "<v Alice>hi there." in formats.render(t, "vtt", names)
    assert formats.render(t, "tsv", names).splitlines()[:2] == [
        "start\tend\tspeaker\ttext",
        "0\t1000\tAlice\thi there.",
    ]
    data = json.loads(formats.render(t, "json", names))
    assert [s["speaker"] for s in data["segments"]] == ["Alice", "SPEAKER_2", "SPEAKER_2"]
    # without speakers, the exports are unchanged
    plain = Transcript("hi", [Segment(0, 0.0, 1.0, " hi")], "en", 1.0)
    assert formats.render(plain, "txt") == "hi\n"
    assert formats.render(plain, "tsv") == "start\tend\ttext\n0\t1000\thi\n"
    assert "speaker" not in json.loads(formats.render(plain, "json"))["segments"][0]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    simple: list[object] = [
        None,
        rng.choice([True, False]),
        rng.randint(-(10**12), 10**12),
        rng.uniform(-1e6, 1e6),
        "".join(rng.choice("ab \x00\ud7ff<>\"'\\") for _ in range(rng.randrange(8))),
        rng.choice([0, 1.5, 6.5, 7, -0.0, 1e308]),
    ]
    if kind < 6:
        return simple[kind]
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["start", "end", "text", "speaker", "id", "segments", "speakers", "base_revision"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


async def test_random_edits_never_break_the_server(client: Client, entry_id: str) -> None:
    """Random JSON in every field of an edit: a 2xx or a 4xx, never a 5xx."""
    rng = random.Random(15)
    statuses: set[int] = set()
    current = 0
    for _ in range(300):
        segments = [_random_value(rng) for _ in range(rng.randrange(4))]
        if rng.random() < 0.5:
            segments = [
                {"start": _random_value(rng), "end": _random_value(rng), "text": _random_value(rng)}
                for _ in range(rng.randrange(3))
            ]
        body = {
            "base_revision": rng.choice([current, current, _random_value(rng)]),
            "segments": rng.choice([segments, _random_value(rng)]),
            "speakers": rng.choice([{}, _random_value(rng)]),
        }
        response = await _patch(client, entry_id, body)
        statuses.add(response.status_code)
        assert response.status_code < 500, (body, await response.get_data())
        if response.status_code == 200:
            current = (await response.get_json())["revision"]
        elif response.status_code == 409:
            assert (await response.get_json())["error"]["current_revision"] == current
    assert {200, 400, 409} <= statuses, statuses
    for bad in ("x", "-1", "1.5", "٣", "9" * 20):
        response = await client.get(f"/api/history/{entry_id}/revisions/{bad}")
        assert response.status_code == 404
        response = await client.post(f"/api/history/{entry_id}/revisions/{bad}/restore")
        assert response.status_code == 404


async def test_the_original_and_the_latest_revisions_are_kept(
    app: Quart, entry_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_module, "MAX_REVISIONS", 3)
    history: History = app.extensions["appliance"].history
    for n in range(5):
        segments = [{"id": 0, "start": 0.0, "end": 1.0, "text": f" take {n}"}]
        assert await history.save_revision(entry_id, n, segments, {}) == n + 1
    revisions = await history.revisions(entry_id)
    assert revisions is not None
    assert [r["revision"] for r in revisions] == [0, 3, 4, 5]
    assert await history.revision(entry_id, 2) is None
    original = await history.revision(entry_id, 0)
    assert original is not None and original["text"].startswith("the quick brown fox")
