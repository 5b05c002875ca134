"""Streaming multipart uploads: to a private temp dir, never whole in RAM, size-limited.

The body is parsed incrementally (werkzeug's sans-IO multipart decoder) while it arrives; the
file part is written to `DATA_DIR/tmp` (0700) and the upload is refused with 413 as soon as it
passes MAX_UPLOAD_SIZE. Everything else (preamble, part headers, form fields, epilogue, the
number of parts, the whole body) has its own bound, so a chunked body cannot make the server
hold more than a few hundred KiB of it. Temp files left by a crash are removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from quart import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import (
    Data,
    Event,
    Field,
    File,
    MultipartDecoder,
    NeedData,
    State,
)

from appliance.web.errors import APIError

MAX_FIELD_BYTES = 64 * 1024  # one form field's value
MAX_FIELDS = 64  # form field values, besides the file part
MAX_FORM_BYTES = 256 * 1024  # every form field's value together
MAX_PREAMBLE_BYTES = 64 * 1024  # before the first boundary
MAX_PART_HEADER_BYTES = 16 * 1024  # one part's headers
MAX_EPILOGUE_BYTES = 64 * 1024  # after the closing boundary (counted and dropped)
MAX_BODY_OVERHEAD = 1024 * 1024  # the whole body may pass the file limit by this much
FEED_BYTES = 64 * 1024  # the decoder gets at most this much at a time
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
    request: Request,
    tmp_dir: Path,
    max_size: int,
    file_field: str = "file",
    file_optional: bool = False,
) -> Upload:
    """Parse the request body as multipart/form-data, streaming the file to `tmp_dir`.

    What is held in memory is bounded whatever the body (chunked or not): the decoder is fed
    at most FEED_BYTES at a time; the preamble, each part's headers and the epilogue are cut
    off at their limits; form fields at MAX_FIELD_BYTES each and MAX_FORM_BYTES together; the
    whole body at `max_size + MAX_BODY_OVERHEAD`. A refusal ends the request without reading
    the rest of the body (the server then closes the connection).
    """
    mimetype = request.mimetype
    boundary = request.mimetype_params.get("boundary", "")
    if mimetype != "multipart/form-data" or not boundary:
        raise APIError(
            415,
            "unsupported_media_type",
            "send the audio as multipart/form-data with a 'file' part",
        )
    max_body = max_size + MAX_BODY_OVERHEAD
    if request.content_length is not None and request.content_length > max_body:
        raise APIError(413, "file_too_large", _too_large(max_size))
    parser = _Parser(MultipartDecoder(boundary.encode(), max_parts=MAX_FIELDS + 1))
    upload = Upload()
    received = 0
    try:
        async for chunk in request.body:
            received += len(chunk)
            if received > max_body:
                raise APIError(413, "file_too_large", _too_large(max_size))
            for start in range(0, len(chunk), FEED_BYTES):
                parser.feed(
                    chunk[start : start + FEED_BYTES], upload, tmp_dir, max_size, file_field
                )
        if not _at_end(parser.decoder):
            raise APIError(
                400, "malformed_multipart", "the multipart body is truncated or malformed"
            )
    except RequestEntityTooLarge:  # the decoder's max_parts
        parser.close()
        upload.discard()
        raise APIError(
            413, "too_many_parts", f"the form has more than {MAX_FIELDS + 1} parts"
        ) from None
    except APIError:
        parser.close()
        upload.discard()
        raise
    except ValueError as exc:  # werkzeug raises ValueError on a malformed body
        parser.close()
        upload.discard()
        raise APIError(400, "malformed_multipart", f"malformed multipart body: {exc}") from None
    except BaseException:
        parser.close()
        upload.discard()
        raise
    parser.close()
    if upload.file_path is None and file_optional:  # issue 15: a `url` field instead
        return upload
    if upload.file_path is None:
        raise APIError(400, "missing_file", f"the form has no {file_field!r} file part")
    if upload.file_size == 0:
        upload.discard()
        raise APIError(400, "empty_file", "the uploaded file is empty")
    return upload


class _Parser:
    """The decoder's events turned into an `Upload`, with every buffer bounded."""

    def __init__(self, decoder: MultipartDecoder) -> None:
        self.decoder = decoder
        self.current: Field | File | None = None
        self.field_buf = bytearray()
        self.form_bytes = 0
        self.epilogue = 0
        self.out: BinaryIO | None = None

    def feed(
        self, data: bytes, upload: Upload, tmp_dir: Path, max_size: int, file_field: str
    ) -> None:
        decoder = self.decoder
        if _at_end(decoder):
            self.epilogue += len(data)  # after the closing boundary: counted, never kept
        else:
            decoder.receive_data(data)
            while not isinstance(event := decoder.next_event(), NeedData):
                self._event(event, upload, tmp_dir, max_size, file_field)
            if _at_end(decoder):
                self.epilogue += len(decoder.buffer)
                decoder.buffer.clear()
        if self.epilogue > MAX_EPILOGUE_BYTES:
            raise APIError(
                413,
                "body_too_large",
                f"more than {MAX_EPILOGUE_BYTES // 1024} KiB after the closing multipart boundary",
            )
        if decoder.state is State.PREAMBLE and len(decoder.buffer) > MAX_PREAMBLE_BYTES:
            raise APIError(
                400,
                "malformed_multipart",
                f"no multipart boundary in the first {MAX_PREAMBLE_BYTES // 1024} KiB",
            )
        if decoder.state is State.PART and len(decoder.buffer) > MAX_PART_HEADER_BYTES:
            raise APIError(
                400,
                "malformed_multipart",
                f"part headers longer than {MAX_PART_HEADER_BYTES // 1024} KiB",
            )

    def _event(
        self, event: Event, upload: Upload, tmp_dir: Path, max_size: int, file_field: str
    ) -> None:
        if isinstance(event, File):
            if event.name != file_field or upload.file_path is not None:
                raise APIError(400, "invalid_request", f"unexpected file part {event.name!r}")
            self.current = event
            upload.file_name = safe_filename(event.filename or "")
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
            self.out = os.fdopen(fd, "wb")
            upload.file_path = Path(tmp_name)
        elif isinstance(event, Field):
            self.current = event
            self.field_buf.clear()
            if sum(len(v) for v in upload.fields.values()) >= MAX_FIELDS:
                raise APIError(400, "invalid_request", "too many form fields")
        elif isinstance(event, Data):
            current = self.current
            if isinstance(current, File) and self.out is not None:
                upload.file_size += len(event.data)
                if upload.file_size > max_size:
                    raise APIError(413, "file_too_large", _too_large(max_size))
                self.out.write(event.data)
                if not event.more_data:
                    self.close()
            elif isinstance(current, Field):
                self._field_data(current.name, event, upload)

    def _field_data(self, name: str, event: Data, upload: Upload) -> None:
        self.field_buf.extend(event.data)
        self.form_bytes += len(event.data)
        if len(self.field_buf) > MAX_FIELD_BYTES:
            raise APIError(400, "invalid_request", f"field {name!r} is too long")
        if self.form_bytes > MAX_FORM_BYTES:
            raise APIError(
                413,
                "form_too_large",
                f"the form fields hold more than {MAX_FORM_BYTES // 1024} KiB together",
            )
        if not event.more_data:
            try:
                value = self.field_buf.decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, "invalid_request", f"field {name!r} is not UTF-8") from None
            upload.fields.setdefault(name, []).append(value)

    def close(self) -> None:
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()
            self.out = None


def _at_end(decoder: MultipartDecoder) -> bool:
    """Whether the closing boundary was read (what follows is the epilogue)."""
    return decoder.state is State.EPILOGUE


def _too_large(max_size: int) -> str:
    return f"the upload is larger than the limit of {max_size / 1000**2:.0f} MB (MAX_UPLOAD_SIZE)"
