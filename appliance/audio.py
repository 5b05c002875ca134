"""Audio probing and decoding with PyAV (FFmpeg's libraries): content decides, not extensions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from appliance.engines.base import SAMPLE_RATE, Audio


class NotAudioError(ValueError):
    """The file holds no decodable audio stream."""

    code = "unsupported_audio"

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Probe:
    format: str
    duration: float
    codec: str


def probe(path: Path) -> Probe:
    """Open the file with FFmpeg and make sure it has an audio stream that decodes."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise NotAudioError("the file has no audio track")
            stream = container.streams.audio[0]
            duration = 0.0
            if container.duration:
                duration = container.duration / 1_000_000
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            # Decode the first frame: a header alone (truncated file) is not audio we can use.
            for _frame in container.decode(stream):
                break
            else:
                raise NotAudioError("the audio track holds no decodable sound")
            return Probe(container.format.name, duration, stream.codec_context.name)
    except NotAudioError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise NotAudioError(
            f"not a readable audio or video file ({exc.__class__.__name__})"
        ) from None


def decode(path: Path) -> Audio:
    """Decode the first audio track to 16 kHz mono float32, as every engine expects.

    faster-whisper's own `decode_audio` does the same but ends with a full `gc.collect()`
    (against a PyAV resampler leak of 2023, gone in PyAV 12+): in the server's large heap that
    one call cost ~80 ms of CPU per request, more than the rest of the request path together.
    """
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise NotAudioError("the file has no audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            fifo = av.AudioFifo()
            chunks: list[np.ndarray] = []
            for frame in _valid_frames(container.decode(audio=0)):
                frame.pts = None  # the FIFO checks timestamps for gaps; resampling needs none
                fifo.write(frame)
                # Resample in large blocks: per-frame calls (1152 samples for MP3) cost more.
                if fifo.samples >= _RESAMPLE_BLOCK:
                    chunks.extend(_resampled(resampler, fifo.read()))
            if fifo.samples:
                chunks.extend(_resampled(resampler, fifo.read()))
            chunks.extend(_resampled(resampler, None))
    except (av.FFmpegError, ValueError, IndexError) as exc:
        if isinstance(exc, NotAudioError):
            raise
        raise NotAudioError(f"the audio could not be decoded ({exc.__class__.__name__})") from None
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    pcm = np.concatenate(chunks)
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


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
