"""Streaming multipart uploads: to a private temp dir, never whole in RAM, size-limited.

The body is parsed incrementally (werkzeug's sans-IO multipart decoder) while it arrives; the
file part is written to `DATA_DIR/tmp` (0700) and the upload is refused with 413 as soon as it
passes MAX_UPLOAD_SIZE. Temp files left by a crash are removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from quart import Request
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from appliance.errors import APIError

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 64
TEMP_PREFIX = "upload-"


@dataclass
class Upload:
    """The form fields and the one file of a multipart request."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    file_path: Path | None = None
    file_name: str = ""
    file_size: int = 0

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def get_all(self, name: str) -> list[str]:
        return self.fields.get(name, [])

    def discard(self) -> None:
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)
            self.file_path = None


def safe_filename(name: str) -> str:
    """A display-safe base name: no directories, no control characters, at most 200 chars."""
    name = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().lstrip(".")
    return name[:200] or "audio"


def prepare_tmp_dir(tmp_dir: Path) -> None:
    """Create the private temp dir and remove uploads a crash left behind."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir.chmod(0o700)
    for leftover in tmp_dir.glob(f"{TEMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)


async def receive_upload(
    request: Request, tmp_dir: Path, max_size: int, file_field: str = "file"
) -> Upload:
    """Parse the request body as multipart/form-data, streaming the file to `tmp_dir`."""
    mimetype = request.mimetype
    boundary = request.mimetype_params.get("boundary", "")
    if mimetype != "multipart/form-data" or not boundary:
        raise APIError(
            415,
            "unsupported_media_type",
            "send the audio as multipart/form-data with a 'file' part",
        )
    if request.content_length is not None and request.content_length > max_size + 1024 * 1024:
        raise APIError(413, "file_too_large", _too_large(max_size))
    decoder = MultipartDecoder(boundary.encode(), max_parts=MAX_FIELDS + 1)
    upload = Upload()
    current: Field | File | None = None
    field_buf = bytearray()
    out = None
    finished = False
    try:
        async for chunk in _chunks_then_end(request):
            decoder.receive_data(chunk)
            while True:
                event = decoder.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, File):
                    if event.name != file_field or upload.file_path is not None:
                        raise APIError(
                            400, "invalid_request", f"unexpected file part {event.name!r}"
                        )
                    current = event
                    upload.file_name = safe_filename(event.filename or "")
                    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
                    out = os.fdopen(fd, "wb")
                    upload.file_path = Path(tmp_name)
                elif isinstance(event, Field):
                    current = event
                    field_buf.clear()
                    if sum(len(v) for v in upload.fields.values()) >= MAX_FIELDS:
                        raise APIError(400, "invalid_request", "too many form fields")
                elif isinstance(event, Data):
                    if isinstance(current, File) and out is not None:
                        upload.file_size += len(event.data)
                        if upload.file_size > max_size:
                            raise APIError(413, "file_too_large", _too_large(max_size))
                        out.write(event.data)
                        if not event.more_data:
                            out.close()
                            out = None
                    elif isinstance(current, Field):
                        field_buf.extend(event.data)
                        if len(field_buf) > MAX_FIELD_BYTES:
                            raise APIError(
                                400, "invalid_request", f"field {current.name!r} is too long"
                            )
                        if not event.more_data:
                            try:
                                value = field_buf.decode("utf-8")
                            except UnicodeDecodeError:
                                raise APIError(
                                    400, "invalid_request", f"field {current.name!r} is not UTF-8"
                                ) from None
                            upload.fields.setdefault(current.name, []).append(value)
                elif isinstance(event, Epilogue):
                    finished = True
                    break
            if finished:
                break
        if not finished:
            raise APIError(
                400, "malformed_multipart", "the multipart body is truncated or malformed"
            )
    except APIError:
        _close(out)
        upload.discard()
        raise
    except ValueError as exc:  # werkzeug raises ValueError on a malformed body
        _close(out)
        upload.discard()
        raise APIError(400, "malformed_multipart", f"malformed multipart body: {exc}") from None
    except BaseException:
        _close(out)
        upload.discard()
        raise
    _close(out)
    if upload.file_path is None:
        raise APIError(400, "missing_file", f"the form has no {file_field!r} file part")
    if upload.file_size == 0:
        upload.discard()
        raise APIError(400, "empty_file", "the uploaded file is empty")
    return upload


async def _chunks_then_end(request: Request) -> AsyncIterator[bytes | None]:
    """The body's chunks, then None: the decoder emits the epilogue only at end of data."""
    async for chunk in request.body:
        if chunk:
            yield chunk
    yield None


def _close(out: object) -> None:
    if out is not None:
        with contextlib.suppress(OSError):
            out.close()  # type: ignore[attr-defined]


def _too_large(max_size: int) -> str:
    return f"the upload is larger than the limit of {max_size / 1000**2:.0f} MB (MAX_UPLOAD_SIZE)"
