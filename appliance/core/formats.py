"""Render a transcript as txt, srt, vtt, tsv, json or OpenAI's verbose_json.

Segments may carry a `speaker` label (diarization, or the transcript editor); it is shown as
`[name] ` in TXT and SRT, `<v name>` in VTT and a `speaker` field/column in JSON and TSV, the
label mapped through `speakers` (a history entry's renames) when given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from appliance.core.engines.base import Segment, Transcript, Word

if TYPE_CHECKING:
    from appliance.core.jobs import Job

Names = Mapping[str, str] | None

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


def speaker_of(s: Segment, names: Names = None) -> str | None:
    """The segment's speaker as shown: its label, renamed; None when it has none."""
    label = getattr(s, "speaker", None)
    if not isinstance(label, str) or not label:
        return None
    return (names or {}).get(label, label)


def _word_speaker(w: Word, names: Names) -> str | None:
    label = getattr(w, "speaker", None)
    return (names or {}).get(label, label) if isinstance(label, str) and label else None


def _has_speakers(t: Transcript) -> bool:
    return any(speaker_of(s) for s in t.segments)


def to_txt(t: Transcript, names: Names = None) -> str:
    if not _has_speakers(t):
        return t.text + "\n"
    lines: list[str] = []
    previous: str | None = None
    for s in t.segments:
        who = speaker_of(s, names)
        text = s.text.strip()
        if who and who != previous:
            lines.append(f"[{who}] {text}")
        elif lines:
            lines[-1] += f" {text}"
        else:
            lines.append(text)
        previous = who or previous
    return "\n".join(lines) + "\n"


def _prefixed(s: Segment, names: Names) -> str:
    who = speaker_of(s, names)
    return f"[{who}] {s.text.strip()}" if who else s.text.strip()


def to_srt(t: Transcript, names: Names = None) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{_prefixed(s, names)}\n"
        for i, s in enumerate(t.segments, start=1)
    ]
    return "\n".join(blocks)


def _voice(s: Segment, names: Names) -> str:
    who = speaker_of(s, names)
    if not who:
        return s.text.strip()
    who = who.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<v {who}>{s.text.strip()}"


def to_vtt(t: Transcript, names: Names = None) -> str:
    blocks = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{_voice(s, names)}\n"
        for s in t.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _cell(text: str) -> str:
    return text.strip().replace("\t", " ").replace("\n", " ")


def to_tsv(t: Transcript, names: Names = None) -> str:
    speakers = _has_speakers(t)
    lines = ["start\tend\tspeaker\ttext" if speakers else "start\tend\ttext"]
    for s in t.segments:
        cells = [str(round(s.start * 1000)), str(round(s.end * 1000))]
        if speakers:
            cells.append(_cell(speaker_of(s, names) or ""))
        cells.append(_cell(s.text))
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def verbose(
    t: Transcript, *, task: str = "transcribe", words: bool = False, names: Names = None
) -> dict[str, Any]:
    """OpenAI's verbose_json shape (also our json export), plus `speaker` where known."""
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
    for segment, s in zip(out["segments"], t.segments, strict=True):
        who = speaker_of(s, names)
        if who:
            segment["speaker"] = who
    if words:
        out["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            | ({"speaker": who} if (who := _word_speaker(w, names)) else {})
            for s in t.segments
            for w in s.words
        ]
    return out


def render(t: Transcript, fmt: str, speakers: Names = None) -> str:
    """`speakers`: label -> display name (a history entry's renames)."""
    if fmt == "txt":
        return to_txt(t, speakers)
    if fmt == "srt":
        return to_srt(t, speakers)
    if fmt == "vtt":
        return to_vtt(t, speakers)
    if fmt == "tsv":
        return to_tsv(t, speakers)
    if fmt == "json":
        out = {
            **verbose(t, words=True, names=speakers),
            "segments_full": [asdict(s) for s in t.segments],
        }
        if speakers:
            out["speakers"] = dict(speakers)
        return json.dumps(out)
    raise ValueError(f"unknown format {fmt!r}")


def job_result(job: Job) -> dict[str, Any]:
    """The JSON result of a finished job: `GET /api/jobs/{id}/result` and the webhook body."""
    assert job.result is not None
    data = verbose(job.result, task=job.options.task, words=job.options.word_timestamps)
    return {
        "id": job.history_id,
        "job_id": job.id,
        "text": data["text"],
        "language": data["language"],
        "duration": data["duration"],
        "model": job.model,
        "segments": data["segments"],
        "words": data.get("words"),
        "timings": job.timings,
    }
