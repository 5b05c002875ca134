"""Model manager: bundled models, import, hub download from a local stand-in, LRU, RAM check."""

from __future__ import annotations

import asyncio
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.core.audio import decode
from appliance.core.engines.base import TranscribeOptions
from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine
from appliance.core.model_manager import CATALOGUE, ModelError, ModelManager
from tests.conftest import serve_directory
from tests.wer import normalise


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    return ModelManager(FasterWhisperEngine(), tmp_path / "models", cache_size=1)


def test_catalogue_has_the_issue_models() -> None:
    for name in (
        "tiny",
        "tiny.en",
        "base",
        "base.en",
        "small",
        "small.en",
        "medium",
        "medium.en",
        "large-v3",
        "large-v3-turbo",
        "distil-large-v3",
    ):
        spec = CATALOGUE[name]
        assert spec.size_mb > 0 and spec.ram_mb > 0
    assert CATALOGUE["tiny.en"].languages == "English only"
    assert CATALOGUE["base"].multilingual


def test_bundled_models_are_found_and_base_is_assembled(manager: ModelManager) -> None:
    tiny = manager.locate("tiny.en")
    assert tiny is not None and (tiny / "model.bin").is_file()
    base = manager.locate("base")
    assert base == manager.models_dir / "base"
    assert (base / "model.bin").stat().st_size > 140_000_000
    states = {m["name"]: m["state"] for m in manager.status()}
    assert states["tiny.en"] == "available"
    assert states["base"] == "available"
    assert states["large-v3"] == "not_downloaded"
    assert manager.locate("small") is None


async def test_lru_keeps_cache_size_and_never_drops_running_work(
    manager: ModelManager, jfk_wav: Path
) -> None:
    audio = decode(jfk_wav)
    options = TranscribeOptions(language="en", beam_size=1)
    # Loading base evicts tiny.en from the cache, but tiny.en is still in use here.
    async with manager.use("tiny.en") as tiny, manager.use("base") as base:
        assert list(manager.loaded) == ["base"]
        _info, segments = await asyncio.to_thread(tiny.transcribe, audio, options)
        text = "".join(s.text for s in await asyncio.to_thread(list, segments))
        assert "ask not what your country" in normalise(text)
        _info, segments = await asyncio.to_thread(base.transcribe, audio, options)
        text = "".join(s.text for s in await asyncio.to_thread(list, segments))
        assert "your country" in normalise(text)
    status = {m["name"]: m for m in manager.status()}
    assert status["base"]["state"] == "loaded"
    assert status["base"]["load_seconds"] > 0
    assert status["tiny.en"]["state"] == "available"


async def test_refuses_a_model_the_host_cannot_hold(tmp_path: Path) -> None:
    greedy = ModelManager(FasterWhisperEngine(), tmp_path / "m", min_free_mb=10**9)
    with pytest.raises(ModelError) as info:
        await greedy.get("tiny.en")
    assert info.value.code == "insufficient_memory"
    assert info.value.status == 507
    assert "needs about" in info.value.message


async def test_unknown_and_missing_models(manager: ModelManager) -> None:
    with pytest.raises(ModelError, match="unknown model") as info:
        await manager.get("../../etc")
    assert info.value.status == 404
    with pytest.raises(ModelError, match="download or import") as info:
        await manager.get("small")
    assert info.value.status == 409


def _model_archive(tmp_path: Path, manager: ModelManager, kind: str) -> Path:
    source = manager.locate("tiny.en")
    assert source is not None
    if kind == "tar":
        archive = tmp_path / "tiny.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(source, arcname="faster-whisper-tiny.en")
    else:
        archive = tmp_path / "tiny.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for f in source.iterdir():
                zf.write(f, f"nested/dir/{f.name}")
    return archive


@pytest.mark.parametrize("kind", ["tar", "zip"])
async def test_import_archive_then_transcribe(
    tmp_path: Path, manager: ModelManager, jfk_wav: Path, kind: str
) -> None:
    archive = _model_archive(tmp_path, manager, kind)
    target = manager.import_model("my-tiny", archive)
    assert (target / "model.bin").is_file()
    assert "my-tiny" in [m["name"] for m in manager.status()]
    async with manager.use("my-tiny") as model:
        _info, segments = await asyncio.to_thread(
            model.transcribe, decode(jfk_wav), TranscribeOptions(beam_size=1)
        )
        text = "".join(s.text for s in await asyncio.to_thread(list, segments))
    assert "ask not what your country" in normalise(text)
    manager.delete("my-tiny")
    assert not target.exists()


def test_import_refuses_hostile_and_broken_archives(tmp_path: Path, manager: ModelManager) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tf:
        tf.add(payload, arcname="../../escaped")
    with pytest.raises(ModelError, match="escapes"):
        manager.import_model("evil", evil)
    assert not (manager.models_dir.parent / "escaped").exists()
    linked = tmp_path / "link.tar"
    with tarfile.open(linked, "w") as tf:
        info = tarfile.TarInfo("model.bin")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        tf.addfile(info)
    with pytest.raises(ModelError, match="link"):
        manager.import_model("linked", linked)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ModelError, match="not a model archive"):
        manager.import_model("junk", junk)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ModelError, match=r"model\.bin"):
        manager.import_model("empty", empty)
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ModelError, match="invalid model name"):
            manager.import_model(bad, empty)
    assert [p.name for p in manager.models_dir.iterdir()] == []


@pytest.fixture
def stand_in_hub(tmp_path: Path, manager: ModelManager) -> Iterator[str]:
    """A local server laid out like the hub: /<repo>/resolve/main/<file>."""
    root = tmp_path / "hub"
    repo_dir = root / CATALOGUE["tiny.en"].repo / "resolve" / "main"
    repo_dir.mkdir(parents=True)
    source = manager.locate("tiny.en")
    assert source is not None
    for f in source.iterdir():
        (repo_dir / f.name).symlink_to(f)
    with serve_directory(root) as url:
        yield url


async def test_download_from_hub_with_progress(tmp_path: Path, stand_in_hub: str) -> None:
    fresh = ModelManager(FasterWhisperEngine(), tmp_path / "fresh", hub_url=stand_in_hub)
    # tiny.en is bundled, so drop the bundle lookup to force the download path.
    fresh_name = "tiny.en"
    progress: list[float] = []
    path = await fresh.download(fresh_name, progress.append)
    assert (path / "model.bin").stat().st_size > 70_000_000
    assert progress == sorted(progress)
    assert progress[-1] == pytest.approx(100.0)
    assert len(progress) > 10
    assert fresh.status()[0]["state"] == "available"
    item = await fresh.get(fresh_name)
    fresh.release(fresh_name, item)
    assert np.isfinite(item.load_seconds)


async def test_download_failure_is_clear(tmp_path: Path, stand_in_hub: str) -> None:
    fresh = ModelManager(FasterWhisperEngine(), tmp_path / "f2", hub_url=stand_in_hub)
    with pytest.raises(ModelError, match=r"no model\.bin") as info:
        await fresh.download("small")  # the stand-in only has tiny.en
    assert info.value.status == 502
    offline = ModelManager(FasterWhisperEngine(), tmp_path / "f3", hub_url="http://127.0.0.1:9")
    with pytest.raises(ModelError, match="import the model archive instead"):
        await offline.download("small")
    assert not any(p.name.startswith(".download") for p in (tmp_path / "f3").iterdir())
