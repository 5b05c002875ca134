"""Audio probing and decoding with PyAV (FFmpeg's libraries): content decides, not extensions.

A small upload can expand to a lot of audio (3 hours of silence is 2 MB of FLAC, 1.3 GB of
float32), so nothing here trusts the file: `probe` refuses absurd sample rates and channel
counts and audio longer than the caller's limit from the headers, and every decode counts the
samples it produces and stops at the same limit when the headers lied. `decode_to_file` keeps
the decoded audio in an anonymous temp file instead of memory, read back in windows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import av
import numpy as np

from appliance.core.engines.base import SAMPLE_RATE, Audio

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 32


class AudioRejectedError(ValueError):
    """The file is refused: `code` and `status` are what the API answers."""

    code = "unsupported_audio"
    status = 415

    @property
    def message(self) -> str:
        return str(self)


class NotAudioError(AudioRejectedError):
    """The file holds no decodable audio stream (or one with absurd parameters)."""


class AudioTooLongError(AudioRejectedError):
    """The audio lasts longer than MAX_AUDIO_DURATION (from its headers or once decoded)."""

    code = "audio_too_long"
    status = 413


@dataclass(frozen=True)
class Probe:
    format: str
    duration: float
    codec: str
    sample_rate: int = 0
    channels: int = 0


def _too_long(seconds: float | None, limit: float) -> AudioTooLongError:
    """`seconds` from the headers, or None when decoding found more than they said."""
    if seconds is None:
        return AudioTooLongError(
            f"the decoded audio is longer than the limit of {_hms(limit)} (MAX_AUDIO_DURATION)"
        )
    return AudioTooLongError(
        f"the audio lasts {_hms(seconds)}, longer than the limit of {_hms(limit)} "
        "(MAX_AUDIO_DURATION)"
    )


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _check_format(sample_rate: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise NotAudioError(
            f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    if channels < 1:
        raise NotAudioError("the audio track has no channel layout FFmpeg understands")
    if channels > MAX_CHANNELS:
        raise NotAudioError(f"{channels} audio channels (at most {MAX_CHANNELS} are accepted)")


def probe(path: Path, max_duration: float | None = None) -> Probe:
    """Open the file with FFmpeg and make sure it has an audio stream that decodes.

    Refuses (before decoding anything) a sample rate or channel count no recording has, and a
    duration over `max_duration` seconds as far as the headers tell; `decode` enforces the same
    limit on the samples it really produces.
    """
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise NotAudioError("the file has no audio track")
            stream = container.streams.audio[0]
            # From the headers where they tell (some formats only say once decoded), so that a
            # 1 Hz or 1 MHz file is refused before any decoding; then from the first frame.
            header_rate, header_channels = (
                stream.codec_context.sample_rate,
                stream.codec_context.channels,
            )
            _check_format(header_rate or MIN_SAMPLE_RATE, header_channels or 1)
            duration = 0.0
            if container.duration:
                duration = container.duration / 1_000_000
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            if max_duration is not None and duration > max_duration:
                raise _too_long(duration, max_duration)
            # Decode the first frame: a header alone (truncated file) is not audio we can use.
            for frame in container.decode(stream):
                _check_format(frame.sample_rate, frame.layout.nb_channels)
                # and one that converts: FFmpeg cannot downmix some channel layouts.
                frame.pts = None
                av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE).resample(frame)
                break
            else:
                raise NotAudioError("the audio track holds no decodable sound")
            return Probe(
                container.format.name,
                duration,
                stream.codec_context.name,
                frame.sample_rate,
                frame.layout.nb_channels,
            )
    except AudioRejectedError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise NotAudioError(
            f"not a readable audio or video file ({exc.__class__.__name__})"
        ) from None


def decode(path: Path, max_duration: float | None = None) -> Audio:
    """Decode the first audio track to 16 kHz mono float32, as every engine expects.

    All of it in memory: for short clips and tools. Jobs use `decode_to_file`.

    faster-whisper's own `decode_audio` does the same but ends with a full `gc.collect()`
    (against a PyAV resampler leak of 2023, gone in PyAV 12+): in the server's large heap that
    one call cost ~80 ms of CPU per request, more than the rest of the request path together.
    """
    chunks = list(_pcm16_blocks(path, max_duration))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    pcm = np.concatenate(chunks)
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


class PCMFile:
    """Decoded audio (16 kHz mono signed 16-bit) in an anonymous temp file, read in windows.

    Memory stays bounded by the window a caller reads, not by the length of the recording; the
    file has no name (O_TMPFILE, or unlinked at once), so it disappears when closed, or when the
    process dies: nothing is left to clean up after a crash.
    """

    def __init__(self, file: IO[bytes], samples: int) -> None:
        self._file = file
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    def read(self, start: int, stop: int) -> Audio:
        """Samples [start, stop) as float32, exactly as `decode` would have returned them."""
        start = max(0, min(start, self.samples))
        stop = max(start, min(stop, self.samples))
        self._file.seek(start * 2)
        return pcm16_to_float(self._file.read((stop - start) * 2))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PCMFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def decode_to_file(
    path: Path, max_duration: float | None = None, tmp_dir: Path | None = None
) -> PCMFile:
    """Decode like `decode`, into an anonymous file in `tmp_dir` (default: the file's own)."""
    file = tempfile.TemporaryFile(dir=tmp_dir or path.parent)  # noqa: SIM115 (PCMFile owns it)
    try:
        samples = 0
        for block in _pcm16_blocks(path, max_duration):
            file.write(block.astype("<i2", copy=False).tobytes())
            samples += block.shape[0]
        file.flush()
    except BaseException:
        file.close()
        raise
    return PCMFile(file, samples)


def _pcm16_blocks(path: Path, max_duration: float | None) -> Iterator[np.ndarray]:
    """The first audio track as blocks of 16 kHz mono int16, at most `max_duration` seconds."""
    limit = None if max_duration is None else round(max_duration * SAMPLE_RATE)
    produced = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise NotAudioError("the file has no audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            fifo = av.AudioFifo()
            for frame in _valid_frames(container.decode(audio=0)):
                # Every frame: a stream may change its parameters on the way.
                _check_format(frame.sample_rate, frame.layout.nb_channels)
                frame.pts = None  # the FIFO checks timestamps for gaps; resampling needs none
                fifo.write(frame)
                # Resample in large blocks: per-frame calls (1152 samples for MP3) cost more.
                if fifo.samples * max(2, frame.layout.nb_channels) >= 2 * _RESAMPLE_BLOCK:
                    for block in _resampled(resampler, fifo.read()):
                        produced += block.shape[0]
                        if limit is not None and produced > limit:
                            raise _too_long(None, limit / SAMPLE_RATE)
                        yield block
            tail = _resampled(resampler, fifo.read()) if fifo.samples else []
            for block in tail + _resampled(resampler, None):
                produced += block.shape[0]
                if limit is not None and produced > limit:
                    raise _too_long(None, limit / SAMPLE_RATE)
                yield block
    except AudioRejectedError:
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise NotAudioError(f"the audio could not be decoded ({exc.__class__.__name__})") from None


_RESAMPLE_BLOCK = 500_000


def _valid_frames(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    """Skip frames FFmpeg cannot decode (a damaged stretch) instead of failing the whole file."""
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.InvalidDataError:
            continue


def _resampled(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> list[np.ndarray]:
    return [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]


def pcm16_to_float(data: bytes) -> Audio:
    """Little-endian signed 16-bit PCM (the live protocol's frames) to float32 in [-1, 1]."""
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)
