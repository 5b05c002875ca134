"""Capacity planning (issue 16): audio-hours one CPU core transcribes per hour, per model, and
how many appliance nodes a daily load needs.

Each model transcribes the long-form recording (`bench/longform.py`, 6.5 min of real speech
with pauses) through the service's file path — batched, the default for files — with ONE
thread, so the number is per core: a node with n cores runs n such jobs side by side (the
service's default `WORKER_PROCESSES` = one per core). Per core-hour = audio seconds / wall
seconds on one core; CPU seconds are reported next to it because other work on a shared machine
stretches the wall clock and not the CPU time. The node table assumes 2-core nodes kept at most
70 % busy (headroom for live sessions and peaks) and the load spread over 8 working hours or
the whole day. Used by `bench.run` (section "capacity"), alone: `python -m bench.capacity
[--models tiny.en,base]`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from bench.common import wer
from bench.longform import recording, run_config

CONFIG = "faster-whisper batched"
NODE_CORES = 2
BUSY = 0.7  # a node is planned at 70 % of its capacity
DAILY_LOADS = (50, 500, 2000, 5000)  # audio-hours per day


def per_core_hour(run: dict[str, Any]) -> float:
    """Audio-hours one core transcribes per hour (wall clock of a one-thread run)."""
    return float(run["duration"]) / float(run["seconds"])


def nodes_needed(daily_hours: float, core_hour_rate: float, spread_hours: float) -> int:
    """2-core nodes at `BUSY` for `daily_hours` of audio arriving over `spread_hours`."""
    per_node = core_hour_rate * NODE_CORES * BUSY * spread_hours
    return max(1, math.ceil(daily_hours / per_node))


@dataclass
class CapacitySection:
    """`make bench` section: audio-hours per core-hour for each model, nodes per daily load."""

    models: list[str]
    minutes: float = 6.0
    title: str = "Capacity planning: audio-hours per core-hour and nodes per daily load"
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def setup(self, ctx: Any) -> None:
        from bench.common import model_dir

        self.audio, self.reference = recording(self.minutes)
        self.dirs = {}
        for model in self.models:
            try:
                self.dirs[model] = model_dir(model)
            except (FileNotFoundError, RuntimeError) as exc:
                self.skipped[model] = str(exc)
        self.runs = {m: [] for m in self.dirs}

    def run_round(self, ctx: Any, index: int) -> None:
        for model, directory in self.dirs.items():
            print(f"capacity round {index + 1}: {model}", file=sys.stderr, flush=True)
            self.runs[model].append(run_config(CONFIG, directory, self.audio, 1))

    def best(self, model: str) -> dict[str, Any] | None:
        runs = self.runs.get(model) or []
        return min(runs, key=lambda r: r["seconds"]) if runs else None

    def report(self, ctx: Any) -> str:
        rows, plan = [], []
        for model in self.models:
            best = self.best(model)
            if best is None:
                rows.append(f"| {model} | — | — | — | {self.skipped.get(model, 'not run')} |")
                continue
            rate = per_core_hour(best)
            cpu_rate = float(best["duration"]) / float(best["cpu_s"])
            error = wer([self.reference], [best["text"]])
            rows.append(f"| {model} | {rate:.1f} | {cpu_rate:.1f} | {error:.1f} % | |")
            needed = [
                f"{nodes_needed(h, rate, 8)} / {nodes_needed(h, rate, 24)}" for h in DAILY_LOADS
            ]
            plan.append(f"| {model} | " + " | ".join(needed) + " |")
        duration = next((r["duration"] for runs in self.runs.values() for r in runs), 0.0)
        return "\n".join(
            [
                f"The {duration / 60:.1f}-minute long-form recording, batched (the file default),"
                " one thread per job: the rate of one core. A node runs one job per core"
                " side by side.",
                "",
                "| model | audio-hours per core-hour (wall) | per core-hour (CPU time) | WER"
                " | note |",
                "|---|---|---|---|---|",
                *rows,
                "",
                f"2-core nodes needed at {BUSY:.0%} busy, audio arriving over 8 working hours /"
                " over 24 hours:",
                "",
                "| model | " + " | ".join(f"{h} h/day" for h in DAILY_LOADS) + " |",
                "|---|" + "---|" * len(DAILY_LOADS),
                *plan,
                "",
                "Add one node for redundancy: the cluster keeps serving when one node is down.",
            ]
        )

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    section = CapacitySection([m for m in args.models.split(",") if m])
    section.setup(None)
    for index in range(args.rounds):
        section.run_round(None, index)
    print(section.report(None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
