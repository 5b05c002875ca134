"""The inbox: audio files dropped into WATCH_DIR are transcribed without a browser or a script.

A file is taken once it is completely written: its size, modification time and inode stayed the
same for WATCH_SETTLE_SECONDS (polling every WATCH_POLL_SECONDS; portable, works on any file
system and over Samba, needs no inotify). It is then *claimed*: renamed into
`WATCH_DIR/.processing/<job id>/` (atomic, same directory tree), so a restart knows what was in
flight. The claimed file is copied into the job queue like an upload (same MAX_UPLOAD_SIZE,
MAX_AUDIO_DURATION and probe), the job's id being the claim's. When the job is done its
results (WATCH_FORMATS) are written to `done/` and the original moved beside them; when it
fails the original goes to `failed/` with `<name>.error.txt` saying why.

Restarts: `done/` and `failed/` are never scanned, so nothing is transcribed twice; a claim
left by the previous run is resumed from its job (recovered by the job queue, or already
finished and in the history), or submitted again when there is none; files that arrived while
the service was down are found by the first scan.

The folder is shared with people (and a Samba share): nothing in it is trusted. Every path is
opened relative to a directory descriptor with O_NOFOLLOW, so a symbolic link, wherever it is
dropped (a file, `done`, `failed`), never makes the service read or write outside the folder;
links and other non-regular files go to `failed/`. Names are kept as they are (they are single
path components by construction), shortened only where a result name would exceed the file
system's 255 bytes, and made display-safe for logs, error files and the history. Results never
overwrite anything: a name already taken gets ` (2)`, ` (3)`, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from appliance.core import audio, diarize, formats
from appliance.core.engines.base import TranscribeOptions, Transcript
from appliance.core.jobs import JOB_ID, Job, JobState, JobStoreError, QueueFullError
from appliance.core.model_manager import ModelError
from appliance.web.services import Services
from appliance.web.upload import TEMP_PREFIX, safe_filename

log = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
PROCESSING = ".processing"
ERROR_SUFFIX = ".error.txt"
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs)
EMPTY_SETTLE_SECONDS = 60.0  # an empty file may be a copy that has not started writing yet
CLAIM_RETRY_SECONDS = 60.0  # a file that could not be taken (permissions) is tried again then
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RESULT_MODE = 0o660  # the share's user (same group) reads and deletes what we write
_DIR_MODE = 0o770
_COPY_CHUNK = 1024 * 1024


class InboxUnavailableError(Exception):
    """WATCH_DIR (or one of its folders) cannot be used right now; retried at the next scan."""


class RejectedError(Exception):
    """This file is not transcribed; the message is written to its `.error.txt`."""


@dataclass
class _Seen:
    key: tuple[int, int, int]  # size, mtime_ns, inode
    since: float  # monotonic time it was first seen with this key


def display_name(name: str) -> str:
    """A name safe for logs, error files and the history (no control characters, valid UTF-8)."""
    text = os.fsencode(name).decode("utf-8", "replace")
    return safe_filename(text)


def _split(name: str, formats_: tuple[str, ...]) -> tuple[str, str]:
    """(stem, extension) of a dropped file's name; results are `<stem>.<format>`."""
    stem, ext = PurePosixPath(name).stem, PurePosixPath(name).suffix
    if not stem or any(f"{stem}.{fmt}" == name for fmt in formats_):
        return name, ""  # `notes.txt` holding audio: results `notes.txt.txt`, never itself
    return stem, ext


def _shorten(stem: str, room: int) -> str:
    """The stem cut (at a character boundary) to `room` bytes."""
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem or "audio"


def _failed_names(name: str, n: int) -> tuple[str, str]:
    """Names in failed/ of the original and its `<name>.error.txt`, with ` (n)` for n > 1."""
    stem, ext = PurePosixPath(name).stem, PurePosixPath(name).suffix
    if not stem or len(os.fsencode(ext)) > NAME_MAX // 2:
        stem, ext = name, ""
    suffix = "" if n == 1 else f" ({n})"
    room = NAME_MAX - len(os.fsencode(suffix + ext + ERROR_SUFFIX))
    if len(os.fsencode(stem)) > room:
        stem = _shorten(stem, room)
    original = stem + suffix + ext
    return original, original + ERROR_SUFFIX


def _names(name: str, n: int, tails: tuple[str, ...], formats_: tuple[str, ...]) -> list[str]:
    """Names of the original and its companion files, with ` (n)` for n > 1; each fits."""
    stem, ext = _split(name, formats_)
    suffix = "" if n == 1 else f" ({n})"
    longest = max(len(os.fsencode(t)) for t in (ext, *tails))
    room = NAME_MAX - len(os.fsencode(suffix)) - longest
    if len(os.fsencode(ext)) > NAME_MAX // 2:  # an "extension" that is most of the name
        stem, ext = name, ""
        longest = max(len(os.fsencode(t)) for t in tails)
        room = NAME_MAX - len(os.fsencode(suffix)) - longest
    if len(os.fsencode(stem)) > room:
        stem = _shorten(stem, room)
    base = stem + suffix
    return [base + ext, *(base + tail for tail in tails)]


@contextlib.contextmanager
def _opendir(name: str, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _move_no_replace(name: str, src_fd: int, target: str, dst_fd: int) -> None:
    """Move without ever replacing: link + unlink (atomic refusal), else check + rename."""
    try:
        os.link(name, target, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # links not allowed here (a FAT mount, protected_hardlinks): rename
        if _exists(target, dst_fd):
            raise FileExistsError(errno.EEXIST, "exists", target) from None
        os.rename(name, target, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    os.unlink(name, dir_fd=src_fd)


def _write_new(name: str, dir_fd: int, text: str) -> None:
    """Create `name` (never an existing file, never through a link) holding `text`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, _RESULT_MODE, dir_fd=dir_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        with contextlib.suppress(OSError):  # the umask took bits the share's user needs
            os.fchmod(fd, _RESULT_MODE)
        out.write(text)


def _file_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link; links are never followed, drop the file itself"
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "a device, not a file"


class Inbox:
    """Watches `settings.watch_dir`; `start()` / `stop()` from the app's serving hooks."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        assert settings.watch_dir is not None
        self.services = services
        self.root = settings.watch_dir
        self.formats = settings.watch_formats
        self.settle = float(settings.watch_settle_seconds)
        self.poll = float(settings.watch_poll_seconds)
        self.limit = max(1, services.jobs.workers)  # files in flight at once: the API keeps room
        self.seen: dict[str, _Seen] = {}
        self.handling: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._problem = ""  # the last "cannot use WATCH_DIR" message, logged once

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        log.info("watching %s for audio files (results: %s)", self.root, ",".join(self.formats))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop scanning; claims in flight stay in .processing for the next start."""
        tasks = [t for t in (self._task, *self.handling.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.handling.clear()

    async def _loop(self) -> None:
        while True:
            await self.scan()
            await asyncio.sleep(self.poll)

    async def scan(self) -> None:
        """One pass: resume claims, claim the files that settled, start their jobs."""
        try:
            claims, stable = await asyncio.to_thread(self._scan, time.monotonic())
        except InboxUnavailableError as exc:
            if str(exc) != self._problem:
                log.warning("inbox paused: %s", exc)
                self._problem = str(exc)
            return
        except Exception:
            log.exception("inbox scan failed")
            return
        if self._problem:
            log.info("inbox %s usable again", self.root)
            self._problem = ""
        for claim in claims:
            if claim not in self.handling and len(self.handling) < self.limit:
                self._spawn(claim)
        for name in stable:
            if len(self.handling) >= self.limit:
                break
            try:
                taken = await asyncio.to_thread(self._claim, name)
            except Exception:
                log.exception("could not take %s from the inbox", display_name(name))
                seen = self.seen.get(name)
                if seen is not None:  # not again at every scan: in a minute
                    seen.since = time.monotonic() + CLAIM_RETRY_SECONDS
                continue
            self.seen.pop(name, None)
            if taken is not None:
                self._spawn(taken)

    def _spawn(self, claim: str) -> None:
        task = asyncio.create_task(self._handle(claim))
        self.handling[claim] = task
        task.add_done_callback(lambda _: self.handling.pop(claim, None))

    # --- the folder (blocking, in a thread) --------------------------------------------------
    @contextlib.contextmanager
    def _dirs(self) -> Iterator[dict[str, int]]:
        """Descriptors of WATCH_DIR and its three folders, made where missing; no links."""
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InboxUnavailableError(f"WATCH_DIR {self.root} is not usable: {exc}") from None
        fds = {"root": root}
        try:
            for name in (DONE, FAILED, PROCESSING):
                created = False
                try:
                    # never a setgid bit in the mode (systemd's RestrictSUIDSGID refuses it);
                    # the kernel passes a setgid parent's bit on by itself
                    os.mkdir(name, _DIR_MODE, dir_fd=root)
                    created = True
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise InboxUnavailableError(f"cannot create {name}/: {exc}") from None
                try:
                    fds[name] = os.open(name, _DIR_FLAGS, dir_fd=root)
                except OSError as exc:
                    raise InboxUnavailableError(
                        f"{self.root / name} must be a folder (not a link or a file): {exc}"
                    ) from None
                if created:  # group-writable despite the umask, setgid kept; refused in the
                    # sandbox when setgid: the inbox_share role makes these folders itself
                    with contextlib.suppress(OSError):
                        os.fchmod(
                            fds[name], _DIR_MODE | (os.fstat(fds[name]).st_mode & stat.S_ISGID)
                        )
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def _scan(self, now: float) -> tuple[list[str], list[str]]:
        """(claims to resume, names that stayed unchanged long enough)."""
        with self._dirs() as fds:
            listed = os.listdir(fds[PROCESSING])  # noqa: PTH208 (a descriptor)
            claims = [c for c in sorted(listed) if JOB_ID.fullmatch(c)]
            listed = os.listdir(fds["root"])  # noqa: PTH208 (a descriptor)
            names = [n for n in listed if not n.startswith((".", "~"))]
            present: set[str] = set()
            stable: list[str] = []
            for name in sorted(names):
                if name in (DONE, FAILED):
                    continue
                try:
                    st = os.stat(name, dir_fd=fds["root"], follow_symlinks=False)
                except FileNotFoundError:  # gone between the listing and now
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue  # folders people make are theirs: only the top level is watched
                present.add(name)
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                seen = self.seen.get(name)
                if seen is None or seen.key != key:
                    self.seen[name] = _Seen(key, now)
                    continue
                wait = self.settle if st.st_size else max(self.settle, EMPTY_SETTLE_SECONDS)
                if now - seen.since >= wait or not stat.S_ISREG(st.st_mode):
                    stable.append(name)
            for name in set(self.seen) - present:  # deleted or renamed by their owner
                del self.seen[name]
        return claims, stable

    def _claim(self, name: str) -> str | None:
        """Move a settled file into its own folder under .processing; None if it went away."""
        with self._dirs() as fds:
            try:
                st = os.stat(name, dir_fd=fds["root"], follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(st.st_mode):
                reason = f"{display_name(name)} is {_file_kind(st.st_mode)}"
                self._fail_entry(name, fds["root"], fds[FAILED], reason)
                return None
            claim = uuid.uuid4().hex
            os.mkdir(claim, 0o700, dir_fd=fds[PROCESSING])
            with _opendir(claim, fds[PROCESSING]) as cfd:
                try:
                    os.rename(name, name, src_dir_fd=fds["root"], dst_dir_fd=cfd)
                except FileNotFoundError:
                    os.rmdir(claim, dir_fd=fds[PROCESSING])
                    return None
        log.info("inbox: %s taken as job %s", display_name(name), claim)
        return claim

    def _claimed(self, claim: str) -> str | None:
        """The name of the file in a claim folder; an empty claim folder is removed."""
        with self._dirs() as fds, _opendir(claim, fds[PROCESSING]) as cfd:
            entries = os.listdir(cfd)  # noqa: PTH208 (a descriptor)
            if not entries:
                os.rmdir(claim, dir_fd=fds[PROCESSING])
                return None
            return entries[0]

    def _copy_out(self, claim: str, name: str, limit: int) -> Path:
        """Copy the claimed file into the upload temp dir (the job takes that copy over)."""
        tmp_dir = self.services.settings.tmp_dir
        with self._dirs() as fds, _opendir(claim, fds[PROCESSING]) as cfd:
            try:
                src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise RejectedError(
                        f"{display_name(name)} is {_file_kind(stat.S_IFLNK)}"
                    ) from None
                raise
            with os.fdopen(src, "rb") as infile:
                st = os.fstat(infile.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise RejectedError(f"{display_name(name)} is {_file_kind(st.st_mode)}")
                if st.st_size == 0:
                    raise RejectedError(f"{display_name(name)} is empty")
                if st.st_size > limit:
                    raise RejectedError(_too_large(name, st.st_size, limit))
                fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
                copied = 0
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := infile.read(_COPY_CHUNK):
                            copied += len(chunk)
                            if copied > limit:  # it grew since fstat
                                raise RejectedError(_too_large(name, copied, limit))
                            out.write(chunk)
                except BaseException:
                    Path(tmp_name).unlink(missing_ok=True)
                    raise
        return Path(tmp_name)

    def _deliver(self, claim: str, name: str, results: dict[str, str]) -> str:
        """Write the results into done/ and move the original beside them; the name used."""
        tails = tuple(f".{fmt}" for fmt in results)
        with self._dirs() as fds, _opendir(claim, fds[PROCESSING]) as cfd:
            for n in range(1, 10_000):
                original, *outputs = _names(name, n, tails, self.formats)
                if any(_exists(t, fds[DONE]) for t in (original, *outputs)):
                    continue
                try:
                    written: list[str] = []
                    for target, text in zip(outputs, results.values(), strict=True):
                        _write_new(target, fds[DONE], text)
                        written.append(target)
                    _move_no_replace(name, cfd, original, fds[DONE])
                except FileExistsError:  # someone took the name meanwhile: next number
                    for target in written:
                        with contextlib.suppress(OSError):
                            os.unlink(target, dir_fd=fds[DONE])
                    continue
                os.rmdir(claim, dir_fd=fds[PROCESSING])
                return original
        raise OSError("no free name in done/")

    def _fail_claim(self, claim: str, name: str, reason: str) -> None:
        with self._dirs() as fds, _opendir(claim, fds[PROCESSING]) as cfd:
            self._fail_entry(name, cfd, fds[FAILED], reason)
            os.rmdir(claim, dir_fd=fds[PROCESSING])

    def _fail_entry(self, name: str, src_fd: int, failed_fd: int, reason: str) -> None:
        """Move `name` (whatever it is, links included: never followed) to failed/ + why."""
        for n in range(1, 10_000):
            original, error_file = _failed_names(name, n)
            if _exists(original, failed_fd) or _exists(error_file, failed_fd):
                continue
            try:
                _write_new(error_file, failed_fd, f"{reason}\n")
            except FileExistsError:
                continue
            try:
                _move_no_replace(name, src_fd, original, failed_fd)
            except FileExistsError:
                os.unlink(error_file, dir_fd=failed_fd)
                continue
            except FileNotFoundError:  # went away meanwhile: the error file would be alone
                os.unlink(error_file, dir_fd=failed_fd)
                return
            log.warning("inbox: %s -> failed/: %s", display_name(name), reason)
            return
        raise OSError("no free name in failed/")

    # --- one claimed file (on the loop) ------------------------------------------------------
    async def _handle(self, claim: str) -> None:
        try:
            name = await asyncio.to_thread(self._claimed, claim)
            if name is None:
                return
            job = await self.services.jobs.get(claim)
            if job is None:
                try:
                    job = await self._submit(claim, name)
                except RejectedError as exc:
                    await asyncio.to_thread(self._fail_claim, claim, name, str(exc))
                    return
                if job is None:
                    return  # the queue is full: the next scan tries again
            await self.services.jobs.wait(job)
            if not job.state.finished:
                return  # the server is stopping: the job and the claim resume at the next start
            await self._finish(claim, name, job)
        except asyncio.CancelledError:
            raise
        except InboxUnavailableError as exc:
            log.warning("inbox: %s", exc)
        except Exception:
            log.exception("inbox: could not handle job %s", claim)
            await asyncio.sleep(self.poll * 10)  # not straight again: the scan re-spawns it

    async def _finish(self, claim: str, name: str, job: Job) -> None:
        if job.state == JobState.DONE and job.result is not None:
            transcript: Transcript = job.result
            results = {fmt: formats.render(transcript, fmt) for fmt in self.formats}
            kept = await asyncio.to_thread(self._deliver, claim, name, results)
            log.info("inbox: %s transcribed into done/ (job %s)", display_name(kept), job.id)
            return
        if job.state == JobState.DONE:
            reason = "its transcript was deleted from the history before it could be written"
        elif job.state == JobState.CANCELLED:
            reason = "the transcription was cancelled"
        else:
            reason = (job.error or {}).get("message") or "the transcription failed"
        await asyncio.to_thread(self._fail_claim, claim, name, f"{display_name(name)}: {reason}")

    def _options(self) -> tuple[str, TranscribeOptions]:
        s = self.services
        model = s.settings.watch_model or s.default_model
        try:
            s.models.check_name(model)
        except ModelError as exc:
            raise RejectedError(f"WATCH_MODEL: {exc.message}") from None
        if s.models.locate(model) is None:
            raise RejectedError(
                f"model {model!r} is not on this appliance yet: download or import it in the "
                "admin panel"
            )
        if s.settings.watch_diarize and diarize.find_weights(s.settings.data_dir) is None:
            raise RejectedError(
                "speaker diarization (WATCH_DIARIZE) needs the speaker model: run"
                " `python -m appliance.core.diarize fetch DATA_DIR` once"
            )
        language = s.settings.watch_language or s.default_language
        return model, TranscribeOptions(language=language, diarize=s.settings.watch_diarize)

    async def _submit(self, claim: str, name: str) -> Job | None:
        s = self.services
        model, options = self._options()
        limit = s.max_upload_size
        path = await asyncio.to_thread(self._copy_out, claim, name, limit)
        shown = display_name(name)
        try:
            info = await asyncio.to_thread(audio.probe, path, s.settings.max_audio_duration)
        except audio.AudioRejectedError as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, audio.AudioTooLongError):
                raise RejectedError(f"{shown}: {exc}") from None
            raise RejectedError(f"{shown} is not audio FFmpeg can decode: {exc}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        job = Job(
            model=model,
            options=options,
            audio_path=path,
            duration=info.duration,
            source="inbox",
            filename=shown,
            id=claim,
        )
        try:
            return await s.jobs.submit(job)  # the copy belongs to the job from here on
        except (QueueFullError, JobStoreError) as exc:
            log.info("inbox: %s waits: %s", shown, exc)
            return None


def _too_large(name: str, size: int, limit: int) -> str:
    return (
        f"{display_name(name)} is larger ({size} bytes) than the limit of {limit} bytes "
        "(MAX_UPLOAD_SIZE)"
    )


async def start(services: Services) -> Inbox | None:
    """The inbox of the running app, or None when WATCH_DIR is not set."""
    if services.settings.watch_dir is None:
        return None
    inbox = Inbox(services)
    await inbox.start()
    return inbox
