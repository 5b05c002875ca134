"""Decoding is bounded by what the audio expands to, not by the upload's size (issue 12, #3).

Probing refuses absurd formats and audio over the limit from the headers; decoding counts the
samples it produces (headers lie); long audio goes to an anonymous temp file and reaches the
engines in windows, so peak memory does not grow with the recording's length.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.core import audio
from appliance.core.engines import create_engine, windowed
from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)
from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine
from appliance.core.model_manager import ModelManager
from tests.wer import normalise

ROOT = Path(__file__).resolve().parent.parent


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=120)


def silence(path: Path, seconds: int, *codec: str, rate: int = 16000) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"anullsrc=r={rate}:cl=mono", "-t", str(seconds), *codec, str(path))
    return path


def wav_bytes(rate: int, channels: int, data: bytes, data_size: int | None = None) -> bytes:
    """A PCM WAV whose header says what we want, whatever the data is."""
    block = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def lying_mp3(path: Path, quiet_seconds: int) -> Path:
    """MP3 without a Xing header: FFmpeg estimates the duration from the first frames' bitrate
    (10 s of loud noise at 160 kbps), and the 8 kbps silence after them lasts far longer."""
    loud, quiet = path.with_suffix(".loud"), path.with_suffix(".quiet")
    raw = ("-write_xing", "0", "-id3v2_version", "0", "-f", "mp3")
    ffmpeg(
        *("-f", "lavfi", "-i", "anoisesrc=r=16000:a=0.5", "-t", "10", "-ac", "1"),
        *("-c:a", "libmp3lame", "-b:a", "160k", *raw, str(loud)),
    )
    silence(quiet, quiet_seconds, "-c:a", "libmp3lame", "-b:a", "8k", *raw)
    path.write_bytes(loud.read_bytes() + quiet.read_bytes())
    return path


@pytest.fixture(scope="module")
def flac_3h(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = silence(tmp_path_factory.mktemp("bomb") / "silence-3h.flac", 3 * 3600, "-c:a", "flac")
    assert path.stat().st_size < 3_000_000  # 2 MB that expand to 3 hours
    return path


# --- probe: refused from the headers, before any decoding --------------------------------------
def test_probe_refuses_audio_over_the_limit_at_once(flac_3h: Path) -> None:
    assert audio.probe(flac_3h, 4 * 3600).duration == pytest.approx(3 * 3600, abs=1)
    t0 = time.perf_counter()
    with pytest.raises(audio.AudioTooLongError) as caught:
        audio.probe(flac_3h, 3600)
    assert time.perf_counter() - t0 < 5
    assert caught.value.status == 413 and caught.value.code == "audio_too_long"
    assert "3:00:00" in caught.value.message and "MAX_AUDIO_DURATION" in caught.value.message


@pytest.mark.parametrize(
    ("rate", "channels", "words"),
    [
        (1, 1, "sample rate 1 Hz"),  # the 244-byte WAV that became 100 s of audio
        (999, 1, "sample rate 999 Hz"),
        (1_000_000, 1, "sample rate 1000000 Hz"),
        (16000, 64, "64 audio channels"),
    ],
)
def test_probe_refuses_absurd_formats(tmp_path: Path, rate: int, channels: int, words: str) -> None:
    path = tmp_path / "odd.wav"
    path.write_bytes(wav_bytes(rate, channels, b"\x01\x02" * channels * 200))
    with pytest.raises(audio.NotAudioError, match=words):
        audio.probe(path, 3600)
    with pytest.raises(audio.NotAudioError, match=words):
        audio.decode(path)


def test_probe_accepts_the_edges(tmp_path: Path) -> None:
    for rate, channels in ((8000, 1), (384_000, 2), (48000, 8)):
        path = tmp_path / f"{rate}-{channels}.wav"
        path.write_bytes(wav_bytes(rate, channels, b"\x00\x01" * (channels * rate // 10)))
        info = audio.probe(path, 3600)
        assert (info.sample_rate, info.channels) == (rate, channels)
        assert audio.decode(path).shape[0] == pytest.approx(1600, abs=2)


def test_probe_refuses_a_layout_ffmpeg_cannot_downmix(tmp_path: Path) -> None:
    path = tmp_path / "32.wav"
    path.write_bytes(wav_bytes(48000, 32, b"\x00\x01" * 32 * 4800))
    with pytest.raises(audio.NotAudioError):
        audio.probe(path, 3600)  # at upload, not when the job runs


# --- decode: the limit holds when the headers lie ----------------------------------------------
def test_decode_counts_samples_when_the_headers_lie(tmp_path: Path) -> None:
    liar = lying_mp3(tmp_path / "liar.mp3", 600)
    info = audio.probe(liar, 120)  # the headers say about 40 s
    assert info.duration < 120
    with pytest.raises(audio.AudioTooLongError, match="decoded audio is longer than"):
        audio.decode_to_file(liar, 120)
    with pytest.raises(audio.AudioTooLongError):
        audio.decode(liar, 120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar.loud", "liar.mp3", "liar.quiet"]
    with audio.decode_to_file(liar, 700) as pcm:
        assert pcm.duration == pytest.approx(610, abs=1)


def test_decode_limit_on_a_real_clip(jfk_wav: Path) -> None:
    with pytest.raises(audio.AudioTooLongError):
        audio.decode(jfk_wav, 10.0)  # 11 s
    assert audio.decode(jfk_wav, 11.0).shape[0] == 176_000


# --- decode_to_file: identical samples, no file left behind --------------------------------------
@pytest.mark.parametrize("name", ["jfk.wav", "jfk.mp3"])
def test_decode_to_file_gives_the_same_samples(clips: Path, tmp_path: Path, name: str) -> None:
    expected = audio.decode(clips / name)
    with audio.decode_to_file(clips / name, 3600, tmp_dir=tmp_path) as pcm:
        assert list(tmp_path.iterdir()) == []  # anonymous: nothing to clean up after a crash
        assert len(pcm) == expected.shape[0]
        whole = pcm.read(0, len(pcm))
        assert whole.dtype == np.float32
        assert np.array_equal(whole, expected)
        assert np.array_equal(pcm.read(1000, 5000), expected[1000:5000])
        assert pcm.read(len(pcm) - 10, len(pcm) + 100).shape == (10,)


# --- memory: a bound, in a fresh process ---------------------------------------------------------
_MEASURE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from appliance.core import audio

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    mode, path = sys.argv[1], Path(sys.argv[2])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    base = rss_mb()
    if mode == "refuse":
        try:
            audio.probe(path, 3600)
        except audio.AudioTooLongError:
            pass
        else:
            raise SystemExit("not refused")
    else:
        with audio.decode_to_file(path, 4 * 3600) as pcm:
            assert pcm.duration == 3 * 3600, pcm.duration
            pcm.read(0, 180 * 16000)
    print(peak_mb() - base)
    """
)


@pytest.mark.parametrize(("mode", "bound_mb"), [("refuse", 50), ("decode", 300)])
def test_peak_memory_of_a_3_hour_file_is_bounded(flac_3h: Path, mode: str, bound_mb: int) -> None:
    """Decoding 3 h whole into memory took ~2 GB (and the engine ~10 GB more)."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(flac_3h)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    growth = float(result.stdout.strip().splitlines()[-1])
    assert growth < bound_mb, f"{mode}: peak RSS grew by {growth:.0f} MB"


# --- windows: what reaches an engine is bounded --------------------------------------------------
class SpyModel:
    """A fake engine: one segment per 5 s of what it is given, records every call."""

    is_multilingual = True
    decodes_in_batches = False

    def __init__(self) -> None:
        self.calls: list[tuple[Audio, TranscribeOptions]] = []

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        self.calls.append((audio, options))
        duration = audio.shape[0] / SAMPLE_RATE
        language = options.language or ("fr" if len(self.calls) == 1 else "de")
        info = TranscriptionInfo(language, 0.9, duration)

        def segments() -> Iterator[Segment]:
            for i, start in enumerate(np.arange(0, duration, 5.0)):
                end = min(duration, start + 5.0)
                words = (Word(float(start), float(end), " w", 0.9),)
                yield Segment(i, float(start), float(end), f" s{i}", words)

        return info, segments()

    def close(self) -> None:
        pass


def test_short_audio_is_passed_whole_and_unchanged() -> None:
    model = SpyModel()
    samples = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32)
    info, segments = windowed.transcribe(model, samples, TranscribeOptions(), window_seconds=30)
    assert len(model.calls) == 1 and np.array_equal(model.calls[0][0], samples)
    assert model.calls[0][1] == TranscribeOptions()
    assert info.duration == 30 and [s.id for s in segments] == list(range(6))


def test_long_audio_reaches_the_engine_in_bounded_windows() -> None:
    model = SpyModel()
    rng = np.random.default_rng(1)
    samples = (0.3 * rng.standard_normal(16000 * 600)).astype(np.float32)
    quiet = [150, 290, 431, 575]  # seconds where a 1 s pause lies near each window's end
    for q in quiet:
        samples[q * 16000 : (q + 1) * 16000] = 0
    info, segments = windowed.transcribe(model, samples, TranscribeOptions(), window_seconds=160)
    result = list(segments)
    sizes = [call[0].shape[0] for call in model.calls]
    assert max(sizes) <= 160 * 16000 and sum(sizes) == samples.shape[0]
    # Each window ends in the pause (the quietest 100 ms of its last 30 s).
    bounds = np.cumsum(sizes)[:-1] / 16000
    assert all(q < b < q + 1 for q, b in zip(quiet, bounds, strict=True)), bounds
    # One transcript: the whole duration, the first window's language for all, ids and times run on.
    assert info.duration == 600 and info.language == "fr"
    assert [call[1].language for call in model.calls] == [None, "fr", "fr", "fr", "fr"]
    assert [s.id for s in result] == list(range(len(result)))
    starts = [s.start for s in result]
    assert starts == sorted(starts) and result[-1].end == pytest.approx(600, abs=0.01)
    assert all(s.words[0].start == s.start for s in result)


def test_a_pcm_file_is_read_window_by_window(tmp_path: Path, clips: Path) -> None:
    model = SpyModel()
    with audio.decode_to_file(clips / "jfk.wav", 3600, tmp_dir=tmp_path) as pcm:
        info, segments = windowed.transcribe(model, pcm, TranscribeOptions(), window_seconds=4)
        list(segments)
        joined = np.concatenate([call[0] for call in model.calls])
        assert np.array_equal(joined, audio.decode(clips / "jfk.wav"))
    assert len(model.calls) >= 3 and info.duration == 11


HAS_OPENAI_WHISPER = all(importlib.util.find_spec(m) for m in ("torch", "whisper"))


@pytest.mark.parametrize(
    "engine_name",
    [
        "faster-whisper",
        pytest.param(
            "openai-whisper",
            marks=pytest.mark.skipif(not HAS_OPENAI_WHISPER, reason="openai-whisper extra"),
        ),
    ],
)
def test_real_model_across_window_boundaries(clips: Path, tmp_path: Path, engine_name: str) -> None:
    """Clips joined with pauses, in windows shorter than the whole: every sentence is there."""
    engine = create_engine(
        engine_name, compute_type="int8", cpu_threads=1, workers=1, cache_dir=tmp_path / "cache"
    )
    model_dir = ModelManager(FasterWhisperEngine(), tmp_path / "models").locate("tiny.en")
    assert model_dir is not None
    model = engine.load(model_dir)
    try:
        wavs = sorted((clips / "librivox").glob("*.wav"))
        pause = np.zeros(16000, dtype=np.float32)
        samples = np.concatenate([part for w in wavs for part in (audio.decode(w), pause)])
        whole = audio.decode(clips / "jfk.wav")
        info, segments = windowed.transcribe(model, whole, TranscribeOptions())
        direct_info, direct = model.transcribe(whole, TranscribeOptions())
        assert list(segments) == list(direct)  # one window: the same call
        assert info == direct_info

        info, segments = windowed.transcribe(model, samples, TranscribeOptions(), window_seconds=12)
        result = list(segments)
        text = normalise(" ".join(s.text for s in result))
        for w in wavs:
            reference = normalise(w.with_suffix(".txt").read_text()).split()
            found = sum(word in text.split() for word in reference)
            assert found >= 0.8 * len(reference), (w.name, text)
        assert info.duration == pytest.approx(samples.shape[0] / 16000)
        assert [s.start for s in result] == sorted(s.start for s in result)
        assert result[-1].end <= info.duration + 0.5
    finally:
        model.close()
