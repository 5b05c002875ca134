"""Audio probing and decoding with PyAV (FFmpeg's libraries): content decides, not extensions."""

from __future__ import annotations

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
    """Decode the first audio track to 16 kHz mono float32, as every engine expects."""
    from faster_whisper.audio import decode_audio

    try:
        audio = decode_audio(str(path), sampling_rate=SAMPLE_RATE)
    except (av.FFmpegError, ValueError) as exc:
        raise NotAudioError(f"the audio could not be decoded ({exc.__class__.__name__})") from None
    return np.asarray(audio, dtype=np.float32)


def pcm16_to_float(data: bytes) -> Audio:
    """Little-endian signed 16-bit PCM (the live protocol's frames) to float32 in [-1, 1]."""
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)
