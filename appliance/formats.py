"""Render a transcript as txt, srt, vtt, tsv, json or OpenAI's verbose_json."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from appliance.engines.base import Transcript

EXPORT_FORMATS = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
    "json": "application/json",
}


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(max(0.0, seconds) * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_txt(t: Transcript) -> str:
    return t.text + "\n"


def to_srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
        for s in t.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_tsv(t: Transcript) -> str:
    lines = ["start\tend\ttext"]
    for s in t.segments:
        text = s.text.strip().replace("\t", " ").replace("\n", " ")
        lines.append(f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{text}")
    return "\n".join(lines) + "\n"


def verbose(t: Transcript, *, task: str = "transcribe", words: bool = False) -> dict[str, Any]:
    """OpenAI's verbose_json shape (also our json export)."""
    out: dict[str, Any] = {
        "task": task,
        "language": t.language,
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": s.id,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ],
    }
    if words:
        out["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in t.segments
            for w in s.words
        ]
    return out


def render(t: Transcript, fmt: str) -> str:
    if fmt == "txt":
        return to_txt(t)
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    if fmt == "tsv":
        return to_tsv(t)
    if fmt == "json":
        return json.dumps(
            {**verbose(t, words=True), "segments_full": [asdict(s) for s in t.segments]}
        )
    raise ValueError(f"unknown format {fmt!r}")
