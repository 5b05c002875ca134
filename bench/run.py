"""`make bench` / `python -m bench.run`: every section in one run, results in bench/results.md.

Sections (see `SECTIONS`) run in rounds: each round runs every section once, in order, so all
configurations see the same machine load; per clip the fastest round counts. A section that
cannot run (the service not built yet, the openai-whisper extra missing) says why in the
report instead of failing the run. To add a section, write a class with the `Section` methods
and add it to `build_sections` (`bench/live.py` is the slot for the live-latency run).
The soak (`bench/soak.py`: mixed traffic for minutes, RSS growth) is time-based, not
round-based: `make bench` runs it after this, and it replaces the "Soak" section of the results
file, which this run keeps when it rewrites the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol

from bench.capacity import CapacitySection
from bench.common import ROOT, Clip, clips
from bench.diarize_bench import DiarizationSection
from bench.engines import EnginesSection
from bench.live import LiveSection
from bench.liveload import LiveLoadSection
from bench.longform import LongformSection
from bench.service import ServiceSection
from bench.soak import current_section
from bench.wyoming_bench import WyomingSection

RESULTS = ROOT / "bench" / "results.md"


@dataclass
class Context:
    clips: list[Clip]
    rounds: int
    references: dict[str, str]
    verdicts: list[tuple[str, bool]] = field(default_factory=list)
    service_url: str | None = None


class Section(Protocol):
    title: str

    def setup(self, ctx: Context) -> None: ...
    def run_round(self, ctx: Context, index: int) -> None: ...
    def report(self, ctx: Context) -> str: ...
    def close(self) -> None: ...


SECTIONS = (
    "engines",
    "service",
    "longform",
    "live",
    "liveload",
    "wyoming",
    "diarization",
    "capacity",
)


def build_sections(names: list[str], models: list[str], threads: int) -> list[Section]:
    engines = EnginesSection(models, threads)
    available: dict[str, Section] = {
        "engines": engines,
        "service": ServiceSection(threads),
        "longform": LongformSection(os.cpu_count() or 1),  # every core, for every engine
        "live": LiveSection(),
        "liveload": LiveLoadSection(),  # issue 13: 1, 2, 4 conversational sessions
        "wyoming": WyomingSection(),  # Home Assistant: ours vs wyoming-faster-whisper
        "diarization": DiarizationSection(),  # issue 15: DER and its cost
        "capacity": CapacitySection(models),  # issue 16: audio-hours per core-hour, nodes
    }
    return [available[n] for n in SECTIONS if n in names]


def _versions() -> str:
    found = []
    for dist in ("faster-whisper", "ctranslate2", "openai-whisper", "torch"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best per clip counts")
    parser.add_argument("--models", default="tiny.en,base", help="comma-separated bundled models")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per engine")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    all_clips = clips()
    ctx = Context(all_clips, args.rounds, {c.name: c.reference for c in all_clips})
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    sections = build_sections(names, args.models.split(","), args.threads)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        for section in sections:
            print(f"setup: {section.title}", file=sys.stderr, flush=True)
            section.setup(ctx)
        for index in range(args.rounds):
            for section in sections:
                section.run_round(ctx, index)
        body = [f"## {s.title}\n\n{s.report(ctx)}\n" for s in sections]
    finally:
        for section in sections:
            section.close()
    elapsed = time.monotonic() - started
    verdict = (
        ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in ctx.verdicts) or "none"
    )
    header = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{elapsed / 60:.1f} min: {os.cpu_count()} x {_cpu()}, Python "
        f"{platform.python_version()}, {_versions()}.",
        f"Load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other work on the machine slows every configuration alike; rounds are interleaved).",
        "",
        f"Clips: {len(all_clips)} ({', '.join(c.name for c in all_clips)}), "
        f"{args.rounds} round(s), best round per clip. RTF = audio seconds / seconds taken "
        "(higher is faster), on the wall clock and on CPU time (user + system, all threads); "
        "the engine and service verdicts use CPU time, which other work on the machine "
        "disturbs far less than wall time. WER on lower-cased text without punctuation. "
        "Default options (beam 5, temperature fallback, no VAD).",
        "",
        f"Acceptance: {verdict}",
        "",
    ]
    report = "\n".join(header + body)
    soak = current_section(args.out)  # `make bench` runs bench.soak next; keep the last one
    args.out.write_text(report + (f"\n{soak}" if soak else ""), encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
